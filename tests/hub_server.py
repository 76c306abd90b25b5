"""A loopback HTTP server that serves model repos the way the Hugging Face Hub does, for
huggingface_hub's real download code (HF_ENDPOINT points at it), plus plain files for URL downloads.

Implements what snapshot_download / hf_hub_download use: repo info (`/api/models/{repo}/revision/{rev}`),
the recursive tree listing, and HEAD/GET on `/{repo}/resolve/{rev}/{path}` with the Hub's headers
(X-Repo-Commit, ETag/X-Linked-Etag = sha256 for LFS files, X-Linked-Size) and byte ranges.
Every request is logged so tests can assert what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pkl")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self):
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha1(self.files[name]).digest())
        self.commit = h.hexdigest()


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    plain_files: dict[str, bytes] = field(default_factory=dict)  # served at /files/{name}
    gated: set[str] = field(default_factory=set)  # repo ids whose licence this caller has not accepted
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_folder(self, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra or {})
        self.repos[repo_id] = Repo(files)
        return self.repos[repo_id]

    def downloaded(self) -> list[str]:
        """Repo paths whose bytes were sent (GET on resolve URLs)."""
        return [r.path for r in self.log if r.method == "GET" and "/resolve/" in r.path]


def _blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._handle(body=False)

    def do_GET(self):
        self._handle(body=True)

    def _handle(self, body: bool):
        with self.hub.lock:
            self.hub.log.append(Request(self.command, unquote(urlparse(self.path).path), self.headers.get("Authorization")))
        parts = unquote(urlparse(self.path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo = self._repo("/".join(parts[2:4]))
            if repo is None:
                return
            if parts[4] == "revision":
                siblings = [{"rfilename": n} for n in sorted(repo.files)]
                return self._json({"id": "/".join(parts[2:4]), "sha": repo.commit, "siblings": siblings, "private": False})
            if parts[4] == "tree":
                return self._json([self._tree_entry(n, d) for n, d in sorted(repo.files.items())])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo("/".join(parts[:2]))
            if repo is None:
                return
            name = "/".join(parts[4:])
            if name not in repo.files:
                return self._error(404, "EntryNotFound", f"{name} not found")
            data = repo.files[name]
            etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else _blob_oid(data)
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"'}
            if name.endswith(LFS_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            return self._bytes(data, headers, body)
        if parts[0] == "files" and len(parts) == 2 and parts[1] in self.hub.plain_files:
            return self._bytes(self.hub.plain_files[parts[1]], {}, body)
        self._error(404, "RepoNotFound" if parts[:1] != ["files"] else "EntryNotFound", "not found")

    def _repo(self, repo_id: str) -> Repo | None:
        if repo_id in self.hub.gated:  # the Hub's answer to a caller who has not accepted the licence
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the authorized list")
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": _blob_oid(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self._bytes(data, {"Content-Type": "application/json"}, True)

    def _bytes(self, data: bytes, headers: dict, body: bool):
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
            status = 206
        chunk = data[start:]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(chunk)

    def _error(self, status: int, code: str, message: str):
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def serve(hub: FakeHub) -> tuple[ThreadingHTTPServer, str]:
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
