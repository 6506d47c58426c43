"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the fetch stage's tests (there is no hub here).

It serves local folders as hub repositories through the endpoints that huggingface_hub's ``snapshot_download``
and ``hf_hub_download`` call (and ``datasets`` through them): repo info at a revision, the recursive tree listing,
and ``resolve`` (HEAD for the metadata headers, GET for the bytes). Point the client at it with ``HF_ENDPOINT``.
Each repository has one commit (a hash of its files) that ``main`` and the commit itself resolve to; anything
else answers as the hub does for a missing repository or revision. Every request is recorded in ``requests``
(method, path), so a test can show that nothing asked the hub after the fetch.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Repo:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file())
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(name.encode() + b"\0" + (self.folder / name).read_bytes())
        self.commit = digest.hexdigest()

    def resolves(self, revision: str) -> bool:
        return revision in ("main", self.commit)

    def entry(self, name: str) -> dict:
        data = (self.folder / name).read_bytes()
        return {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


class FakeHub:
    """``with FakeHub({"model": {"org/tiny": folder}, "dataset": {...}}) as hub: env HF_ENDPOINT=hub.url``."""

    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = {(kind, repo_id): Repo(folder) for kind, named in repos.items() for repo_id, folder in named.items()}
        self.requests: list[tuple[str, str]] = []
        self.closed = False  # True: every request is recorded and answered 503, as a hub out of reach
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test reads hub.requests instead
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- routing ---------------------------------------------------------------------------------------
    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        if self.closed:
            return self._error(handler, 503, "Unavailable", "the fake hub is closed")
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            kind = "model" if parts[1] == "models" else "dataset"
            repo_id = "/".join(parts[2:4])
            action, revision = (parts[4], parts[5]) if len(parts) >= 6 else ("revision", "main")
            return self._api(handler, kind, repo_id, action, revision, "/".join(parts[6:]), body)
        kind = "dataset" if parts[0] == "datasets" else "model"
        parts = parts[1:] if kind == "dataset" else parts
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(handler, kind, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        self._error(handler, 404, "EntryNotFound", f"{path}: not served by the fake hub")

    def _repo(self, handler, kind: str, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            self._error(handler, 404, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
            return None
        if not repo.resolves(revision):
            self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _api(self, handler, kind: str, repo_id: str, action: str, revision: str, under: str, body: bool) -> None:
        repo = self._repo(handler, kind, repo_id, revision)
        if repo is None:
            return
        if action == "revision":
            data = {"id": repo_id, "sha": repo.commit, "private": False, "disabled": False, "gated": False,
                    "siblings": [{"rfilename": name} for name in repo.files]}
        elif action == "tree":
            data = [repo.entry(name) for name in repo.files if not under or name.startswith(under.rstrip("/") + "/")]
        else:
            return self._error(handler, 404, "EntryNotFound", f"{action}: not served by the fake hub")
        self._send(handler, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)

    def _resolve(self, handler, kind: str, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(handler, kind, repo_id, revision)
        if repo is None:
            return
        if name not in repo.files:
            return self._error(handler, 404, "EntryNotFound", f"{name}: no such file in {repo_id}")
        data = (repo.folder / name).read_bytes()
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo.commit,
                   "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self._send(handler, 200, data, headers, body)

    def _error(self, handler, status: int, code: str, message: str) -> None:
        self._send(handler, status, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}, True)

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body and handler.command != "HEAD":
            handler.wfile.write(data)
