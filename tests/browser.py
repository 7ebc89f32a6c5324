"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol: renders a page as
the Kubeflow UI shows an HTML artifact (inside ``<iframe sandbox="allow-scripts">``, the
document given as ``srcdoc``) and reports what a user would miss: resources that failed to
load, script errors and what the sandbox blocked, images that did not decode; and a screenshot.

Sandboxed frames stay in the page's renderer (no site isolation), so that the page's own
DevTools session sees their network and console events."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STATE = """JSON.stringify({ready: document.readyState, images: [...document.images].map(image => ({
    src: image.getAttribute('src').slice(0, 60), complete: image.complete, width: image.naturalWidth})),
    charts: document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length})"""


@dataclass
class Rendered:
    problems: list[str] = field(default_factory=list)     # failed loads, HTTP errors, console errors, exceptions
                                                          # (not warnings: Vega warns of every empty hover layer)
    images: list[dict] = field(default_factory=list)      # every <img>: src (start), complete, naturalWidth
    charts: int = 0                                       # Vega charts drawn (canvas or SVG)
    screenshot: bytes = b""


class Browser:
    def __init__(self, folder: Path):
        profile = folder / "profile"
        shutil.rmtree(profile, ignore_errors=True)       # a profile left behind names a port no longer served
        command = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                   "--remote-debugging-port=0", f"--user-data-dir={profile}", "--disable-site-isolation-trials",
                   "--disable-features=IsolateSandboxedIframes,site-per-process", "--window-size=1200,900",
                   *(["--no-sandbox"] if os.geteuid() == 0 else []), "about:blank"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.socket = self._connect(profile / "DevToolsActivePort")
        except BaseException:
            self.close()
            raise
        self.next_id, self.events = 0, []
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _connect(self, port_file: Path) -> websocket.WebSocket:
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{CHROMIUM} did not start (exit status {self.process.returncode})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # never a proxy for 127.0.0.1
        with direct.open(f"http://127.0.0.1:{port}/json/list") as response:
            [page] = [target for target in json.load(response) if target["type"] == "page"]
        return websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, http_no_proxy=["127.0.0.1"])

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while not any(event.get("method") == method for event in self.events[seen:]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} in {timeout} s")
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.socket.recv()))

    def render(self, url: str, frame_document: bool) -> Rendered:
        """Loads ``url``; reads the images and charts of its only child frame when ``frame_document``,
        else its own, once they are loaded (or after 20 s)."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        context = None
        if frame_document:
            [child] = self.call("Page.getFrameTree")["frameTree"]["childFrames"]
            context = self.call("Page.createIsolatedWorld", frameId=child["frame"]["id"],
                                grantUniveralAccess=True)["executionContextId"]
        deadline = time.monotonic() + 20
        while True:
            arguments = {"expression": STATE, "returnByValue": True, **({"contextId": context} if context else {})}
            state = json.loads(self.call("Runtime.evaluate", **arguments)["result"]["value"])
            if state["ready"] == "complete" and all(image["complete"] for image in state["images"]) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        screenshot = base64.b64decode(self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        return Rendered(self.problems(), state["images"], state["charts"], screenshot)

    def problems(self) -> list[str]:
        urls = {event["params"]["requestId"]: event["params"]["request"]["url"]
                for event in self.events if event.get("method") == "Network.requestWillBeSent"}
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.loadingFailed":
                found.append(f"failed to load {urls.get(params['requestId'], '?')[:100]}: {params['errorText']}")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                found.append(f"HTTP {params['response']['status']} for {params['response']['url'][:100]}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"console {params['entry']['level']} ({params['entry']['source']}): "
                             f"{params['entry']['text'][:200]}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                text = " ".join(str(argument.get("value", argument.get("description"))) for argument in params["args"])
                found.append(f"console.{params['type']}: {text[:200]}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"exception: {details.get('exception', {}).get('description', details['text'])[:200]}")
        return found

    def close(self) -> None:
        if getattr(self, "socket", None):
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def kubeflow_frame(html: str, folder: Path, name: str) -> str:
    """A page that shows ``html`` as the Kubeflow UI's HTML viewer does; returns its file URL."""
    document = json.dumps(html).replace("</", "<\\/")
    page = folder / f"{name}.host.html"
    page.write_text("<!DOCTYPE html><html><body style='margin:0'><iframe id='artifact' sandbox='allow-scripts' "
                    "src='about:blank' style='border:0;width:1180px;height:2400px'></iframe><script>"
                    f"document.getElementById('artifact').srcdoc = {document};</script></body></html>")
    return page.as_uri()
