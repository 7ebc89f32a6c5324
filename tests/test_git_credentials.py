"""The pipeline's data step on a private repository: a git server on 127.0.0.1 (git's own
http-backend behind a small HTTP server) that refuses anonymous clones and accepts one token."""

import base64
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from components.data.materialize import materialize
from components.runtime import StepError
from tests.tiny_repo import make_pinned_repo, sh

TOKEN = "glpat-0123456789abcdefSECRET"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


class GitServer(BaseHTTPRequestHandler):
    root = ""

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def serve(self):
        expected = "Basic " + base64.b64encode(f"ci-bot:{TOKEN}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="private"')
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {**os.environ, "GIT_PROJECT_ROOT": self.root, "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
               "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": "ci-bot",
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body))}
        output = subprocess.run([HTTP_BACKEND], input=body, env=env, capture_output=True, check=True).stdout
        head, _, content = output.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        self.send_response(int(headers.pop("Status", "200").split()[0]))
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def private_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("git-server")
    (folder / "work").mkdir()
    repo = make_pinned_repo(folder / "work")
    sh("git", "clone", "--quiet", "--bare", str(repo), str(folder / "served" / "repo.git"), cwd=folder)
    GitServer.root = str(folder / "served")
    server = ThreadingHTTPServer(("127.0.0.1", 0), GitServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/repo.git", repo
    server.shutdown()


def test_the_data_step_clones_with_the_secret_and_the_token_shows_nowhere(private_repo, tmp_path, monkeypatch, capfd):
    url, repo = private_repo
    monkeypatch.setenv("MAPET_GIT_TOKEN", TOKEN)
    monkeypatch.setenv("MAPET_GIT_USERNAME", "ci-bot")
    described = materialize(url, "main", tmp_path / "workspace", str(repo / ".dvc" / "cache"), [],
                            tmp_path / "params.yaml", git_secret="team-git")
    assert described["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=repo)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["data"]
    captured = capfd.readouterr()
    written = [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    assert TOKEN not in captured.out + captured.err + repr(described)
    assert not any(TOKEN.encode() in content for content in written)          # not in .git/config either


def test_without_the_secret_the_step_fails_naming_it(private_repo, tmp_path, monkeypatch):
    url, repo = private_repo
    for name in ("MAPET_GIT_TOKEN", "MAPET_GIT_USERNAME", "MAPET_GIT_SSH_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StepError, match="refused the clone \\(anonymously: no credentials in the Kubernetes Secret "
                                        "'team-git'\\)"):
        materialize(url, "main", tmp_path / "workspace", str(repo / ".dvc" / "cache"), [], tmp_path / "params.yaml",
                    git_secret="team-git")


def test_a_wrong_token_fails_naming_the_secret_without_showing_the_token(private_repo, tmp_path, monkeypatch):
    url, repo = private_repo
    monkeypatch.setenv("MAPET_GIT_TOKEN", "wrong-" + TOKEN)
    monkeypatch.setenv("MAPET_GIT_USERNAME", "ci-bot")
    with pytest.raises(StepError) as error:
        materialize(url, "main", tmp_path / "workspace", str(repo / ".dvc" / "cache"), [], tmp_path / "params.yaml",
                    git_secret="team-git")
    assert "with the credentials from the Kubernetes Secret 'team-git'" in str(error.value)
    assert TOKEN not in str(error.value)
