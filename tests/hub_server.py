"""A local HTTP server that answers like the Hugging Face hub, for the download tests.

It imitates what huggingface-hub 2.4 asks (read from its file_download.py, hf_api.py and
utils/_http.py):
  GET  /api/models/{owner}/{name}[/revision/{rev}]      model_info; ?blobs=true adds sizes and LFS
  GET  /api/models/{owner}/{name}/tree/{rev}[/{path}]   list_repo_tree (?recursive=true)
  HEAD /{owner}/{name}/resolve/{rev}/{path}             get_hf_file_metadata
  GET  /{owner}/{name}/resolve/{rev}/{path}             a plain download
As on the real hub, an LFS file's resolve answers 302 to a CDN on another origin (here: a second
port), carrying X-Repo-Commit, X-Linked-Etag (the sha256) and X-Linked-Size; the client stops at
that redirect for metadata. The CDN serves the bytes with Accept-Ranges, Range and 206. Small
non-LFS files are served by the hub itself with their git blob id as ETag. Errors carry the
X-Error-Code header the client turns into RepositoryNotFoundError and friends.

Every request is recorded. Faults on demand: drop the connection at a byte offset (`drop_at`,
`drops`), corrupt one byte (`corrupt`), ignore Range headers (`ignore_range`), slow down
(`chunk_delay_s`), pause mid-file until told (`hold`), answer like a broken mirror (`malformed`,
one of MALFORMED).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

CHUNK = 1 << 20
MALFORMED = {
    "lfs-fields": "model info whose LFS entries lack pointerSize",
    "siblings": "model info whose file list is an object, not a list",
    "not-json": "model info that is not JSON",
}
_SHA_CACHE: dict[Path, tuple[int, str]] = {}  # the 98 MB test model is hashed once per session


@dataclass(frozen=True)
class RepoFile:
    """One file in a fake repo."""

    path: str
    content: bytes | Path
    size: int
    sha256: str
    git_oid: str  # git blob id: of the file for small files, of the LFS pointer for LFS files
    lfs: bool


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class HubServer:
    """The fake hub and its CDN, each on its own port of 127.0.0.1."""

    drop_at: int | None = None  # close the connection when a response reaches this file offset
    drops: int = 0  # how many responses to cut that way
    corrupt: bool = False  # flip one byte in the middle of every file served
    ignore_range: bool = False  # answer 200 with the whole file even when asked for a range
    chunk_delay_s: float = 0.0  # pause after each MiB sent
    hold: threading.Event | None = None  # a download pauses after its first MiB until this is set
    malformed: str | None = None  # a key of MALFORMED: answer like a broken hub mirror
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    _servers: dict[str, ThreadingHTTPServer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_file(self, repo: str, path: str, content: bytes | Path, *,
                 lfs: bool = True) -> RepoFile:
        """Put a file into `repo` (created on first use) and return what the hub knows of it."""
        size, sha256 = _measure(content)
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            oid = _git_oid(f"{pointer}size {size}\n".encode())
        else:
            oid = _git_oid(content if isinstance(content, bytes) else content.read_bytes())
        file = RepoFile(path=path, content=content, size=size, sha256=sha256, git_oid=oid, lfs=lfs)
        self.repos.setdefault(repo, {})[path] = file
        return file

    def commit(self, repo: str) -> str:
        """The fake commit hash of `repo`'s main branch: stable, derived from its files."""
        listing = "".join(f"{f.path}{f.git_oid}" for f in self.repos[repo].values())
        return hashlib.sha1(f"{repo}{listing}".encode()).hexdigest()

    @property
    def endpoint(self) -> str:
        """What HF_ENDPOINT should be."""
        return self._url("hub")

    def start(self) -> HubServer:
        """Listen on two free ports (hub and CDN) in daemon threads."""
        for role in ("hub", "cdn"):
            handler = type(f"{role}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            self._servers[role] = server
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def close(self) -> None:
        """Stop both listeners."""
        for server in self._servers.values():
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def file_downloads(self) -> list[Request]:
        """The GET requests that asked for file bytes."""
        return [r for r in self.requests
                if r.method == "GET" and (r.server == "cdn" or "/resolve/" in r.path)]

    def _url(self, role: str) -> str:
        host, port = self._servers[role].server_address[:2]
        return f"http://{host}:{port}"

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_drop(self, start: int, end: int) -> int | None:
        with self._lock:
            if self.drops > 0 and self.drop_at is not None and start <= self.drop_at <= end:
                self.drops -= 1
                return self.drop_at
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    hub: HubServer
    role: str

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub._record(Request(self.role, self.command, url.path, query, headers))
        path = unquote(url.path)
        if self.role == "cdn":
            match = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
            file = next((f for files in self.hub.repos.values() for f in files.values()
                         if match and f.sha256 == match.group(1)), None)
            return self._send_file(file, head) if file else self._error(404, "EntryNotFound")
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?",
                           path)
        if api and not head:
            repo, kind, revision, sub = api.groups()
            return self._api(repo, kind, revision or "main", sub, query)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            return self._resolve(*resolve.groups(), head=head)
        self._error(404, None, "no such endpoint")

    def _repo(self, repo: str, revision: str) -> dict[str, RepoFile] | None:
        if repo not in self.hub.repos:
            self._error(404, "RepoNotFound", f"Repository {repo} not found")
            return None
        if revision not in ("main", self.hub.commit(repo)):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return self.hub.repos[repo]

    def _api(self, repo: str, kind: str | None, revision: str, sub: str | None,
             query: dict[str, str]) -> None:
        files = self._repo(repo, revision)
        if files is None:
            return
        if kind == "tree":
            prefix = f"{sub.rstrip('/')}/" if sub else ""
            listed = [f for f in files.values() if f.path.startswith(prefix)
                      and (query.get("recursive") == "true" or "/" not in f.path[len(prefix):])]
            body = [{"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path,
                     **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}}
                        if f.lfs else {})} for f in listed]
            return self._json(body, repo)
        blobs = query.get("blobs") in ("true", "True", "1")
        broken = self.hub.malformed
        siblings = [{"rfilename": f.path,
                     **({"size": f.size, "blobId": f.git_oid} if blobs else {}),
                     **({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}}
                        if blobs and f.lfs else {})} for f in files.values()]
        if broken == "lfs-fields":
            for sibling in siblings:
                sibling.get("lfs", {}).pop("pointerSize", None)
        if broken == "siblings":
            siblings = {f["rfilename"]: f for f in siblings}
        if broken == "not-json":
            return self._raw(b"<html>Welcome to our mirror</html>", "text/html", repo)
        self._json({"_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
                    "author": repo.split("/")[0], "sha": self.hub.commit(repo), "private": False,
                    "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                    "lastModified": "2025-01-01T00:00:00.000Z", "tags": ["gguf"],
                    "library_name": "gguf", "siblings": siblings}, repo)

    def _resolve(self, repo: str, revision: str, path: str, head: bool) -> None:
        files = self._repo(repo, revision)
        if files is None:
            return
        commit = self.hub.commit(repo)
        file = files.get(path)
        if file is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist", commit=commit)
        if not file.lfs:
            return self._send_file(file, head, commit=commit)
        self.send_response(302)
        self.send_header("Location", f"{self.hub._url('cdn')}/cdn/{file.sha256}?name={quote(path)}")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{file.git_oid}"')
        self.send_header("X-Linked-Etag", f'"{file.sha256}"')
        self.send_header("X-Linked-Size", str(file.size))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_file(self, file: RepoFile, head: bool, commit: str | None = None) -> None:
        start, end, status = 0, file.size - 1, 200
        asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if asked and not self.hub.ignore_range:
            start = int(asked.group(1))
            end = min(int(asked.group(2)), end) if asked.group(2) else end
            if start >= file.size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{file.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{file.sha256 if file.lfs else file.git_oid}"')
        if commit:
            self.send_header("X-Repo-Commit", commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{file.size}")
        self.end_headers()
        if head:
            return
        drop = self.hub._take_drop(start, end)
        position, stop = start, (drop if drop is not None else end + 1)
        with _open(file.content) as source:
            source.seek(start)
            while position < stop:
                chunk = bytearray(source.read(min(CHUNK, stop - position)))
                middle = file.size // 2 - position
                if self.hub.corrupt and 0 <= middle < len(chunk):
                    chunk[middle] ^= 0xFF
                self.wfile.write(chunk)
                if self.hub.hold is not None and position == start:
                    self.wfile.flush()
                    self.hub.hold.wait(60)
                position += len(chunk)
                if self.hub.chunk_delay_s:
                    time.sleep(self.hub.chunk_delay_s)
        if drop is not None:  # cut the connection mid-body, like a network failure
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _json(self, body: object, repo: str) -> None:
        self._raw(json.dumps(body).encode(), "application/json", repo)

    def _raw(self, data: bytes, content_type: str, repo: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", self.hub.commit(repo))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str = "",
               commit: str | None = None) -> None:
        data = json.dumps({"error": message or code}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@contextmanager
def _open(content: bytes | Path) -> Iterator[BinaryIO]:
    """Bytes or a file path, as one seekable binary stream."""
    with io.BytesIO(content) if isinstance(content, bytes) else content.open("rb") as stream:
        yield stream


def _measure(content: bytes | Path) -> tuple[int, str]:
    if isinstance(content, bytes):
        return len(content), hashlib.sha256(content).hexdigest()
    key = content.resolve()
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = (key.stat().st_size, sha256_of(key))
    return _SHA_CACHE[key]


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def go_online(monkeypatch, endpoint: str) -> None:
    """Let localchat and huggingface_hub reach `endpoint` (and nothing else) for one test.

    conftest sets HF_HUB_OFFLINE=1 and a dead HF_ENDPOINT; huggingface_hub copies both into its
    constants when first imported, so those copies are patched too (the import happens here, not
    at the top: collecting the tests must not import it).
    """
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def dead_endpoint() -> str:
    """An http://127.0.0.1 URL where nothing listens: a hub that cannot be reached."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
