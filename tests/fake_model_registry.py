"""A stand-in for Kubeflow Model Registry's REST server (no registry server runs here): the
endpoints the real `model-registry` client calls to register, find, list and update models,
versions and model artifacts, keeping them in memory. It speaks the server's OpenAPI JSON, so the
tests drive the real client library over HTTP."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/api/model_registry/v1"


class FakeModelRegistry:
    def __init__(self):
        self.models: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.artifacts: dict[str, dict] = {}
        self.links: dict[str, list[str]] = {}                 # version id -> artifact ids
        self.requests: list[tuple[str, str]] = []
        self._ids = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _new(self, body: dict, **fields) -> dict:
        self._ids += 1
        now = str(int(time.time() * 1000))
        return {**body, **fields, "id": str(self._ids), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}

    def _route(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        first = {key: values[0] for key, values in query.items()}

        def found(items, **criteria) -> tuple[int, dict]:
            match = next((item for item in items if all(item.get(k) == v for k, v in criteria.items())), None)
            return (200, match) if match else (404, {"code": "404", "message": "not found"})

        def listing(items) -> tuple[int, dict]:
            return 200, {"items": items, "nextPageToken": "", "pageSize": int(first.get("pageSize", 100)),
                         "size": len(items)}

        if method == "GET" and path == "/registered_models":
            return listing(list(self.models.values()))
        if method == "GET" and path == "/registered_model":
            return found(self.models.values(), name=first["name"])
        if method == "POST" and path == "/registered_models":
            model = self._new(body, state="LIVE")
            self.models[model["id"]] = model
            return 201, model
        if method == "GET" and path == "/model_version":
            return found(self.versions.values(), name=first["name"], registeredModelId=first["parentResourceId"])
        if method == "POST" and path == "/model_versions":
            version = self._new(body, state="LIVE")
            self.versions[version["id"]] = version
            return 201, version
        if match := re.fullmatch(r"/registered_models/(\w+)/versions", path):
            return listing([v for v in self.versions.values() if v["registeredModelId"] == match[1]])
        if method == "PATCH" and (match := re.fullmatch(r"/model_versions/(\w+)", path)):
            self.versions[match[1]].update(body)
            return 200, self.versions[match[1]]
        if method == "POST" and (match := re.fullmatch(r"/model_versions/(\w+)/artifacts", path)):
            artifact = self._new(body)
            self.artifacts[artifact["id"]] = artifact
            self.links.setdefault(match[1], []).append(artifact["id"])
            return 200, artifact
        if method == "GET" and path == "/model_artifact":
            linked = [self.artifacts[i] for i in self.links.get(first["parentResourceId"], [])]
            return found(linked, name=first["name"])
        return 501, {"code": "501", "message": f"the fake registry has no {method} {path}"}

    def _handler(self):
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                registry.requests.append((method, url.path))
                status, document = registry._route(method, url.path.removeprefix(PREFIX), parse_qs(url.query), body)
                payload = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def do_PATCH(self):
                self._answer("PATCH")

            def log_message(self, *args):
                pass

        return Handler
