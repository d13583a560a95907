"""A tiny stand-in for the Hugging Face Hub HTTP API, enough for huggingface_hub.snapshot_download.

It serves, for each repo it knows: the revision info (``GET /api/models/<repo>/revision/<rev>``), the
file listing (``GET /api/models/<repo>/tree/<commit>``) and the files themselves
(``HEAD``/``GET /<repo>/resolve/<commit>/<path>`` with the X-Repo-Commit, ETag and Content-Length
headers the client reads). Repos listed in ``gated`` answer 401 without a token and 403 with a wrong
one (X-Error-Code: GatedRepo), and unknown repos 404 (X-Error-Code: RepoNotFound), as the Hub does.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], gated: dict[str, str] | None = None):
        self.repos = repos  # repo id -> {path in repo: content}
        self.gated = gated or {}  # repo id -> the token that grants access
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._handle(self, send_body=False)

            def do_GET(self):
                hub._handle(self, send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- request handling ------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = unquote(urlparse(req.path).path)
        self.requests.append(f"{req.command} {path}")
        api = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)", path)
        resolve = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        match = api or resolve
        if match is None:
            return self._reply(req, 404, b"{}", send_body, {"X-Error-Code": "EntryNotFound"})
        repo = match["repo"]
        if repo not in self.repos:
            body = json.dumps({"error": "Repository not found"}).encode()
            return self._reply(req, 404, body, send_body, {"X-Error-Code": "RepoNotFound"})
        if repo in self.gated:
            auth = req.headers.get("Authorization", "")
            if auth != f"Bearer {self.gated[repo]}":
                status = 403 if auth else 401
                body = json.dumps({"error": f"Access to model {repo} is restricted."}).encode()
                return self._reply(req, status, body, send_body, {"X-Error-Code": "GatedRepo"})
        files = self.repos[repo]
        if api is not None and api["kind"] == "revision":
            info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
            return self._reply(req, 200, json.dumps(info).encode(), send_body)
        if api is not None:
            tree = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in files.items()
            ]
            return self._reply(req, 200, json.dumps(tree).encode(), send_body)
        name = resolve["file"]
        if name not in files:
            return self._reply(req, 404, b"{}", send_body, {"X-Error-Code": "EntryNotFound"})
        data = files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self._reply(req, 200, data, send_body, headers)

    @staticmethod
    def _reply(req, status: int, body: bytes, send_body: bool, headers: dict[str, str] | None = None) -> None:
        req.send_response(status)
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Content-Type", "application/json" if body[:1] in (b"{", b"[") else "application/octet-stream")
        req.end_headers()
        if send_body:
            req.wfile.write(body)
