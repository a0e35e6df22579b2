"""A small hub-compatible HTTP server for tests (stdlib only), so the real huggingface_hub client
can push and pull with no network.

It implements the part of the Hugging Face hub API that huggingface_hub 2.4 calls for
`create_repo`, `create_branch`, `create_commit`/`upload_folder` (POST preupload, answered
`uploadMode: "regular"` so no LFS/Xet transfer happens, then the NDJSON commit with base64 file
lines), `repo_info`/`model_info`, `list_repo_tree`, and `hf_hub_download`/`snapshot_download`
(HEAD/GET `/{repo}/resolve/{rev}/{file}` with the ETag, X-Repo-Commit and Content-Length headers
the client requires). Real LFS/Xet uploads of large files are not covered.

Every request is recorded (`FakeHub.requests`), so tests can check what was sent — or that
nothing was. With `token=` set, writes and private reads need `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file's bytes (what the hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]
    """The whole tree at this commit: path -> bytes."""


@dataclasses.dataclass
class Repo:
    private: bool
    branches: dict[str, str]
    commits: dict[str, Commit]


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


_REPO_OP = re.compile(
    r"^/api/models/(?P<repo>.+?)/(?P<op>preupload|commit|branch|revision|tree)/(?P<rev>[^/]+)(?P<rest>/.*)?$"
)
_REPO_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)$")
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any
    ):
        super().__init__(message)
        self.status, self.code, self.headers, self.extra = status, code, headers or {}, extra


class FakeHub:
    """`with FakeHub(token="...") as hub:` serves on `hub.url` (127.0.0.1, a free port) in a thread."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections too, so the hub is really gone."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None
            with self._lock:
                for connection in self._connections:
                    try:
                        connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self._connections.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- inspection helpers for tests ------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[self._resolve(repo, revision)].files)

    def commits(self, repo_id: str) -> list[Commit]:
        """Commits in creation order (the first is the repo's initial commit)."""
        return list(self.repos[repo_id].commits.values())

    def seed(self, repo_id: str, files: dict[str, bytes], message: str = "seed") -> str:
        """Create a repo holding `files` without going through the client (e.g. a pickle-only repo)."""
        self._create_repo(repo_id, private=False)
        repo = self.repos[repo_id]
        return self._commit(repo, "main", message, "", files, deleted=())

    # -- state changes ---------------------------------------------------------------------------------
    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\n".join((str(self._counter), *parts)).encode()).hexdigest()

    def _create_repo(self, repo_id: str, private: bool) -> None:
        initial = Commit(
            self._new_oid(repo_id),
            None,
            "initial commit",
            "",
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
        )
        self.repos[repo_id] = Repo(private=private, branches={"main": initial.oid}, commits={initial.oid: initial})

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(
        self, repo: Repo, branch: str, message: str, description: str, added: dict[str, bytes], deleted: tuple[str, ...]
    ) -> str:
        if branch not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        parent = repo.branches[branch]
        files = dict(repo.commits[parent].files)
        for path in deleted:
            files = {p: data for p, data in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        files.update(added)
        oid = self._new_oid(parent, message, *sorted(f"{p}:{git_blob_oid(d)}" for p, d in files.items()))
        repo.commits[oid] = Commit(oid, parent, message, description, files)
        repo.branches[branch] = oid
        return oid


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    # -- plumbing ----------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        body = self._read_body() if method in ("POST", "PUT") else b""
        with self.hub._lock:
            self.hub.requests.append(Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            try:
                self._route(method, split.path, body)
            except _HubError as error:
                headers = {**error.headers, **({"X-Error-Code": error.code} if error.code else {})}
                headers["X-Error-Message"] = str(error)
                payload = json.dumps({"error": str(error), **error.extra}).encode()
                self._send(error.status, payload, headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    # -- API -------------------------------------------------------------------------------------------
    def _authorized(self) -> bool:
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _route(self, method: str, path: str, body: bytes) -> None:
        if self.headers.get("Authorization") and not self._authorized():  # like the hub: a bad token is refused
            raise _HubError(401, "Invalid credentials in Authorization header")
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if match := _REPO_OP.match(path):
            repo_id, op, revision = match["repo"], match["op"], unquote(match["rev"])
            if method == "POST" and op == "preupload":
                return self._preupload(repo_id, revision, json.loads(body))
            if method == "POST" and op == "commit":
                return self._commit(repo_id, revision, body)
            if method == "POST" and op == "branch":
                return self._create_branch(repo_id, revision, json.loads(body or b"{}"))
            if method == "GET" and op == "revision":
                return self._info(repo_id, revision)
            if method == "GET" and op == "tree":
                return self._tree(repo_id, revision, unquote((match["rest"] or "/")[1:]))
        if method == "GET" and (match := _REPO_INFO.match(path)):
            return self._info(match["repo"], "main")
        if method in ("GET", "HEAD") and (match := _RESOLVE.match(path)):
            return self._resolve_file(match["repo"], unquote(match["rev"]), unquote(match["file"]), method == "HEAD")
        raise _HubError(404, f"not implemented by the fake hub: {method} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        self._require_auth()
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            raise _HubError(409, "You already created this model repo", url=url)
        self.hub._create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json(200, {"url": url, "name": repo_id})

    def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self.hub._resolve(repo, payload.get("startingPoint") or "main")
        self._json(200, {})

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        current = repo.commits[self.hub._resolve(repo, revision)].files
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(current[f["path"]]) if f["path"] in current else None,
            }
            for f in payload["files"]
        ]
        self._json(200, {"files": files, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _HubError(400, f"the fake hub only takes regular uploads, got a {key!r} line")
        oid = self.hub._commit(
            repo, revision, header.get("summary", ""), header.get("description", ""), added, tuple(deleted)
        )
        self._json(200, {"success": True, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

    def _info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        oid = self.hub._resolve(repo, revision)
        files = repo.commits[oid].files
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": oid,
                "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            },
        )

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        repo = self._repo(repo_id)
        files = repo.commits[self.hub._resolve(repo, revision)].files
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
            for path, data in sorted(files.items())
            if path.startswith(prefix)
        ]
        self._json(200, entries)

    def _resolve_file(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id)
        oid = self.hub._resolve(repo, revision)
        files = repo.commits[oid].files
        if filename not in files:
            raise _HubError(404, f"{filename} does not exist at {revision}", "EntryNotFound", {"X-Repo-Commit": oid})
        data = files[filename]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        self._send(200, data, headers, head=head)
