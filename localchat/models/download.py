"""One file from an HTTP server into the cache: resumable with Range requests, hashed as it
arrives, checked against sha256 (and git's blob id) before it is moved into place, and a full disk
named as such. huggingface-hub supplies the session (HF_ENDPOINT, proxies, tokens); `store`
decides what to fetch and where it goes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

from localchat.errors import DiskFullError, LocalchatError, ModelFileError, disk_full_error
from localchat.render import format_bytes

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

CHUNK = 1 << 20
RETRY_DELAY_S = 1.0  # grows with each retry that made no progress
MAX_STALLED_TRIES = 4  # connection drops in a row without a new byte before we give up
MAKE_ROOM = "free some space or point HF_HUB_CACHE at a bigger disk"


def hf_hub() -> ModuleType:
    # Imported here, not at module level: `localchat --help` must stay fast and offline-proof.
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors
    import huggingface_hub.utils

    # The library reads the variable once, at import, which may have happened before us; with
    # telemetry on, its user-agent code fetches an "agent harness" registry from the hub.
    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True
    return huggingface_hub


def transport_errors() -> tuple[type[Exception], ...]:
    import httpx2  # huggingface-hub's own HTTP client; its session raises these

    return (httpx2.TransportError,)


def download(url: str, headers: dict[str, str], blob: Path, total: int, sha256: str | None,
              git_sha1: str | None, progress: Progress, label: str) -> None:
    """Stream `url` into `<blob>.incomplete`, resuming what is there; verify; move into place."""
    partial = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > total:
        partial.unlink()
        have = 0
    check_space(blob.parent, total - have, label)
    hashes = _Hashes(total, git_blob=git_sha1 is not None)
    hashes.add_file_prefix(partial, have)
    stalled = 0
    # Closing on Ctrl-C or a full disk keeps every byte written so far, for the next pull.
    with room_for(partial, "then pull again: it resumes where it stopped"), \
            partial.open("ab") as out:
        while have < total:
            before, error = have, None
            try:
                have = _fetch(url, headers, out, have, total, hashes, progress)
            except transport_errors() as exc:
                error = exc
                out.flush()
                have = out.tell()  # the bytes that arrived before the drop are kept and hashed
            if have >= total:
                break
            stalled = 0 if have > before else stalled + 1
            if stalled >= MAX_STALLED_TRIES:
                raise LocalchatError(
                    f"the download of {label} stopped at {have:,} of {total:,} bytes "
                    f"({error or 'the server ended the response early'})",
                    "run the same pull again: it resumes where it stopped")
            time.sleep(RETRY_DELAY_S * stalled)  # no pause after a drop that made progress
        out.flush()
        os.fsync(out.fileno())
    problems = hashes.problems(have, sha256, git_sha1)
    if problems:
        partial.unlink(missing_ok=True)
        raise ModelFileError(f"the download of {label} is corrupt ({problems}); the bad bytes "
                             "were deleted", "run the pull again")
    os.replace(partial, blob)


def _fetch(url: str, headers: dict[str, str], out: BinaryIO, have: int, total: int, hashes: _Hashes,
           progress: Progress) -> int:
    hub = hf_hub()
    request = dict(headers, Range=f"bytes={have}-") if have else headers
    timeout = hub.constants.HF_HUB_DOWNLOAD_TIMEOUT
    with hub.get_session().stream("GET", url, headers=request, timeout=timeout) as response:
        try:
            hub.utils.hf_raise_for_status(response)
        except hub.errors.HfHubHTTPError as exc:
            if response.status_code >= 500:  # worth a retry, like a dropped connection
                raise transport_errors()[0](f"HTTP {response.status_code}") from exc
            raise LocalchatError(f"the download server answered HTTP {response.status_code}",
                                 "run the pull again; it resumes") from exc
        if have and (response.status_code != 206 or
                     _range_start(response.headers.get("Content-Range")) != have):
            out.seek(0)  # the server ignored our Range: start over rather than splice wrong bytes
            out.truncate()
            hashes.reset()
            have = 0
        progress(have, total)
        for chunk in response.iter_bytes():  # as the network delivers: a drop loses nothing
            out.write(chunk)
            hashes.update(chunk)
            have += len(chunk)
            progress(have, total)
    return have


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


class _Hashes:
    """sha256 of the bytes so far, plus git's blob id for small files stored in git, not LFS."""

    def __init__(self, total: int, git_blob: bool) -> None:
        self.total, self.git_blob = total, git_blob
        self.reset()

    def reset(self) -> None:
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(b"blob %d\0" % self.total) if self.git_blob else None

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.sha1:
            self.sha1.update(chunk)

    def add_file_prefix(self, path: Path, length: int) -> None:
        if not length:
            return
        with path.open("rb") as handle:
            while length and (chunk := handle.read(min(CHUNK, length))):
                length -= len(chunk)
                self.update(chunk)

    def problems(self, have: int, sha256: str | None, git_sha1: str | None) -> str:
        found = []
        if have != self.total:
            found.append(f"{have:,} bytes instead of {self.total:,}")
        if sha256 and self.sha256.hexdigest() != sha256:
            found.append(f"sha256 {self.sha256.hexdigest()[:12]}… instead of {sha256[:12]}…")
        if git_sha1 and self.sha1 and self.sha1.hexdigest() != git_sha1:
            found.append("the git blob id does not match")
        return "; ".join(found)


def check_space(directory: Path, needed: int, what: str) -> None:
    free = free_bytes(directory)
    if needed > free:
        raise DiskFullError(f"not enough disk space for {what}: it needs "
                            f"{format_bytes(needed)}, {directory} has {format_bytes(free)} free",
                            "free some space, or point HF_HUB_CACHE at a bigger disk")


def free_bytes(directory: Path) -> int:
    """Free bytes on the disk that holds `directory` (its nearest existing parent)."""
    for path in (directory, *directory.parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return 0


@contextmanager
def room_for(path: Path, then: str) -> Iterator[None]:
    """Turn a write that found no room for `path` into a one-line error; others pass through."""
    try:
        yield
    except OSError as exc:
        full = disk_full_error(exc, path, f"{MAKE_ROOM}, {then}")
        if full is None:
            raise
        raise full from exc
