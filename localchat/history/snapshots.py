"""KV-cache snapshots: resume a conversation without re-reading its history.

When a conversation ends, the llama.cpp KV cache of its tokens is written to a file in the cache
dir; when it resumes, the file is loaded and only the tokens after the saved prefix are processed.

A snapshot file is:

    magic b"LCKVSNAP" | u32 format version | u32 header length | header (JSON, UTF-8)
    | tokens (int32 little-endian, header["token_count"] of them) | llama.cpp state bytes

The header names the model file (path, size, mtime), n_ctx, the llama-cpp-python version and
the KV cache type (--cache-type) the state belongs to, the sha256 of the tokens and the CRC-32 of
the state, so a file that is missing, truncated, corrupt or from another model, context size,
cache type or llama.cpp is refused before llama.cpp sees it. Nothing here raises for a bad
snapshot: every outcome comes back as a result with a note the caller may show under --verbose.
The history database indexes the files (`HistoryStore`'s snapshot methods) and evicts the least
recently used ones above a size cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeGuard

from localchat import paths
from localchat.engine.kv_reuse import shared_prefix
from localchat.engine.runtime import import_llama_cpp
from localchat.errors import LocalchatError
from localchat.history.records import HistoryStore

if TYPE_CHECKING:
    from localchat.engine.local import LocalEngine
    from localchat.engine.protocol import Engine

MAGIC = b"LCKVSNAP"
FORMAT_VERSION = 1
DEFAULT_CAP_BYTES = 2_000_000_000  # 2 GB: a few dozen long conversations of a small model
_PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
_MAX_HEADER_BYTES = 64 * 1024  # a real header is ~300 bytes; more means a damaged length field
# A snapshot that agrees with the history for fewer tokens than this is not worth loading.
_MIN_PARTIAL_TOKENS = 32
_STALE_TEMP_S = 3600.0  # a temp file this old belongs to a process that died mid-write
# A snapshot is indexed right after it is written; the index may wait out another localchat's
# write lock (5 s). A file this old that the index does not name belongs to no conversation.
_UNINDEXED_GRACE_S = 60.0


@dataclass(frozen=True)
class SnapshotKey:
    """What a KV cache is only valid for: this model file, this n_ctx, this llama.cpp.

    `llama_cpp_version` also names the cache layout where it differs: without flash attention
    llama.cpp stores V transposed, so a cache from one setting cannot be read by the other.
    """

    model_identity: str
    n_ctx: int
    llama_cpp_version: str


@dataclass(frozen=True)
class SaveResult:
    """The outcome of `save_snapshot`: the file written (None if not saved) and a note."""

    path: Path | None
    size_bytes: int
    token_count: int
    evicted: tuple[Path, ...]
    note: str


@dataclass(frozen=True)
class RestoreResult:
    """The outcome of `restore_snapshot`; `reused_tokens` the next reply will not re-process."""

    restored: bool
    reused_tokens: int
    note: str


class _Refused(Exception):
    """A snapshot that cannot be used; the message is the note for the user."""


def snapshot_dir() -> Path:
    """Where snapshot files live (rebuildable, so under the cache dir)."""
    return paths.cache_dir() / "snapshots"


def model_identity(model_path: Path) -> str:
    """The model file as path, size and mtime: a re-downloaded or edited file is another model."""
    resolved = Path(model_path).resolve()
    stat = resolved.stat()
    return f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}"


def snapshot_key(engine: LocalEngine) -> SnapshotKey:
    """The key a snapshot of this loaded engine is filed under."""
    return SnapshotKey(
        model_identity=model_identity(engine.info.model_path), n_ctx=engine.n_ctx,
        llama_cpp_version=import_llama_cpp().__version__
        + ("" if engine.info.flash_attn else " without flash attention"),
    )


def cache_type(engine: LocalEngine) -> str:
    """The engine's KV cache type (--cache-type). A snapshot's header records it and a mismatch
    is refused with a note saying so; it is not part of the index key, so a conversation keeps
    one snapshot per model, the latest."""
    return str(getattr(engine.info, "cache_type", "f16"))  # stand-ins in tests may not say


def prefix_hash(tokens: Sequence[int]) -> str:
    """sha256 of a token sequence, as stored in the header and the index."""
    return hashlib.sha256(_token_bytes(tokens)).hexdigest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


def _file_name(store: HistoryStore, conversation_id: int, key: SnapshotKey) -> str:
    # One file per conversation and key; the database path keeps two histories apart, and the
    # prefix says which history a file belongs to, so a sweep touches only its own files.
    digest = hashlib.sha256(
        f"{store.path.resolve()}\n{key.model_identity}\n{key.n_ctx}\n{key.llama_cpp_version}"
        .encode()
    ).hexdigest()[:16]
    return f"{_history_tag(store)}-conversation-{conversation_id}-{digest}.kvsnap"


def _history_tag(store: HistoryStore) -> str:
    return "h" + hashlib.sha256(str(store.path.resolve()).encode()).hexdigest()[:8]


def sweep_orphans(store: HistoryStore) -> list[Path]:
    """Delete this history's snapshot files that its index does not name; return them.

    They are left by a process killed between writing a file and indexing it, or by a history
    whose rows were deleted without their files. Files still being written (younger than a
    minute) and other histories' files are left alone; a busy disk or database only skips it.
    """
    directory = snapshot_dir()
    removed: list[Path] = []
    try:
        tag = _history_tag(store)
        candidates = sorted([*directory.glob(f"{tag}-conversation-*.kvsnap"),
                             *directory.glob(f"{tag}-prefix-*.kvsnap")])
        if not candidates:
            return removed
        owned = {path.resolve() for path in store.snapshot_paths()}
        cutoff = time.time() - _UNINDEXED_GRACE_S
        for path in candidates:
            if path.resolve() not in owned and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
    except (OSError, LocalchatError):
        pass
    return removed


def _supports_state(engine: Engine) -> TypeGuard[LocalEngine]:
    return callable(getattr(engine, "export_state", None)) and callable(
        getattr(engine, "import_state", None)
    )


def save_snapshot(
    engine: Engine, store: HistoryStore, conversation_id: int,
    cap_bytes: int = DEFAULT_CAP_BYTES,
) -> SaveResult:
    """Save the engine's KV cache as the conversation's snapshot; evict LRU files over the cap."""
    if not _supports_state(engine):
        return SaveResult(None, 0, 0, (), "no snapshot: this engine keeps no local KV cache")
    try:
        key = snapshot_key(engine)
        tokens, state = engine.export_state()
    except (OSError, LocalchatError) as exc:
        return SaveResult(None, 0, 0, (), f"no snapshot saved: {_reason(exc)}")
    if not tokens:
        return SaveResult(None, 0, 0, (), "no snapshot saved: the KV cache is empty")
    token_hash = prefix_hash(tokens)
    header = json.dumps({
        "model_identity": key.model_identity, "n_ctx": key.n_ctx,
        "llama_cpp_version": key.llama_cpp_version, "cache_type": cache_type(engine),
        "token_count": len(tokens),
        "prefix_sha256": token_hash, "state_bytes": len(state),
        "state_crc32": zlib.crc32(state), "created_at": int(time.time()),
    }, sort_keys=True).encode()
    parts = (_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)), header, _token_bytes(tokens),
             state)
    size = sum(len(part) for part in parts)
    if size > cap_bytes:
        return SaveResult(None, 0, len(tokens), (),
                          f"no snapshot saved: {size:,} bytes is over the {cap_bytes:,}-byte cap")
    path: Path | None = None
    try:
        directory = paths.ensure_private_dir(snapshot_dir())
        _remove_stale_temp_files(directory)
        sweep_orphans(store)
        target = directory / _file_name(store, conversation_id, key)
        _write_atomically(target, parts)  # if this fails, the last good snapshot is untouched
        path = target
        store.record_snapshot(conversation_id, path, key.model_identity, key.n_ctx,
                              key.llama_cpp_version, token_hash, len(tokens))
        evicted = store.evict_snapshots(cap_bytes)
    except (OSError, LocalchatError) as exc:
        if path is not None:
            path.unlink(missing_ok=True)  # an unindexed file would never be evicted
        return SaveResult(None, 0, len(tokens), (), f"no snapshot saved: {_reason(exc)}")
    note = f"saved a snapshot of {len(tokens)} tokens ({size:,} bytes)"
    if evicted:
        note += f"; evicted {len(evicted)} older snapshot(s) to stay under the cap"
    return SaveResult(path, size, len(tokens), tuple(evicted), note)


def restore_snapshot(
    engine: Engine, store: HistoryStore, conversation_id: int, messages: Sequence[dict[str, str]],
) -> RestoreResult:
    """Load the conversation's snapshot if it fits this engine and is a prefix of `messages`."""
    if not _supports_state(engine):
        return RestoreResult(False, 0, "no snapshot: this engine keeps no local KV cache")
    try:
        key = snapshot_key(engine)
        record = store.find_snapshot(conversation_id, key.model_identity, key.n_ctx,
                                     key.llama_cpp_version)
        if record is None:
            return RestoreResult(False, 0, "no snapshot for this conversation, model and "
                                           "context size: the history will be re-read")
        target = engine.tokenize_messages(messages)
        with record.path.open("rb") as handle:
            header = _read_header(handle, key, record.prefix_hash, cache_type(engine))
            tokens = _read_tokens(handle, header)
            shared = shared_prefix(tokens, target)
            if shared == 0 or (shared < len(tokens) and shared < _MIN_PARTIAL_TOKENS):
                raise _Refused("it does not match the conversation's history")
            with _mapped_state(handle, header) as state:
                engine.import_state(tokens, state)
    except _Refused as exc:
        return RestoreResult(False, 0, f"snapshot ignored: {exc}; the history will be re-read")
    except (OSError, LocalchatError) as exc:
        return RestoreResult(False, 0, f"snapshot ignored: {_reason(exc)}; the history will be "
                                       "re-read")
    # The cache is loaded; a busy database only costs this file its place in the LRU order.
    with contextlib.suppress(LocalchatError):
        store.touch_snapshot(record.id)
    reused = min(shared, len(target) - 1)  # the engine re-evaluates the last prompt token
    note = f"resumed from a snapshot: {reused} of {len(target)} tokens need no processing"
    if shared < len(tokens):
        note += f" (the snapshot's first {shared} of {len(tokens)} tokens match the history)"
    return RestoreResult(True, reused, note)


# ---- a one-shot's fixed prefix: the same files, keys, cap and eviction, found by its tokens ------

def prefix_key(engine: LocalEngine, tokens: Sequence[int]) -> tuple[SnapshotKey, str]:
    """The key and token hash a prefix snapshot of `tokens` is filed under."""
    return snapshot_key(engine), prefix_hash(tokens)


def restore_prefix_snapshot(engine: Engine, store: HistoryStore,
                            prefix: Sequence[int]) -> RestoreResult:
    """Load the snapshot of exactly the tokens `prefix`, if there is one that fits this engine."""
    if not _supports_state(engine):
        return RestoreResult(False, 0, "no snapshot: this engine keeps no local KV cache")
    try:
        key, token_hash = prefix_key(engine, prefix)
        record = store.find_prefix_snapshot(key.model_identity, key.n_ctx,
                                            key.llama_cpp_version, token_hash)
        if record is None:
            return RestoreResult(False, 0, f"no snapshot of this {len(prefix)}-token prefix yet: "
                                           "it is processed, then saved for the next run")
        with record.path.open("rb") as handle:
            header = _read_header(handle, key, record.prefix_hash, cache_type(engine))
            if _read_tokens(handle, header) != list(prefix):
                raise _Refused("its tokens are not this prefix")
            with _mapped_state(handle, header) as state:
                engine.import_state(prefix, state)
    except _Refused as exc:
        return RestoreResult(False, 0, f"prefix snapshot ignored: {exc}")
    except (OSError, LocalchatError) as exc:
        return RestoreResult(False, 0, f"prefix snapshot ignored: {_reason(exc)}")
    with contextlib.suppress(LocalchatError):
        store.touch_prefix_snapshot(record.id)
    return RestoreResult(True, len(prefix), f"loaded the snapshot of the {len(prefix)}-token "
                                             "prefix: only what follows it is processed")


def save_prefix_snapshot(engine: Engine, store: HistoryStore, prefix: Sequence[int],
                         cap_bytes: int = DEFAULT_CAP_BYTES) -> SaveResult:
    """Save the KV cache of the prefix `prefix` (the cache is cut to it: call this last)."""
    if not _supports_state(engine):
        return SaveResult(None, 0, 0, (), "no snapshot: this engine keeps no local KV cache")
    try:
        key, token_hash = prefix_key(engine, prefix)
        if store.find_prefix_snapshot(key.model_identity, key.n_ctx, key.llama_cpp_version,
                                      token_hash) is not None:
            return SaveResult(None, 0, len(prefix), (), "the prefix snapshot is saved already")
        tokens, state = engine.export_state(len(prefix))
    except (OSError, LocalchatError) as exc:
        return SaveResult(None, 0, 0, (), f"no prefix snapshot saved: {_reason(exc)}")
    if tokens != list(prefix):
        return SaveResult(None, 0, 0, (), "no prefix snapshot saved: the KV cache does not hold "
                                          "the prefix")
    parts = _file_parts(key, tokens, state, cache_type(engine))
    size = sum(len(part) for part in parts)
    if size > cap_bytes:
        return SaveResult(None, 0, len(tokens), (),
                          f"no prefix snapshot saved: {size:,} bytes is over the "
                          f"{cap_bytes:,}-byte cap")
    path: Path | None = None
    try:
        directory = paths.ensure_private_dir(snapshot_dir())
        digest = hashlib.sha256(f"{store.path.resolve()}\n{key.model_identity}\n{key.n_ctx}\n"
                                f"{key.llama_cpp_version}".encode()).hexdigest()[:16]
        _remove_stale_temp_files(directory)
        sweep_orphans(store)
        target = directory / f"{_history_tag(store)}-prefix-{token_hash[:16]}-{digest}.kvsnap"
        _write_atomically(target, parts)
        path = target
        store.record_prefix_snapshot(path, key.model_identity, key.n_ctx, key.llama_cpp_version,
                                     token_hash, len(tokens))
        evicted = store.evict_snapshots(cap_bytes)
    except (OSError, LocalchatError) as exc:
        if path is not None:
            path.unlink(missing_ok=True)
        return SaveResult(None, 0, len(tokens), (), f"no prefix snapshot saved: {_reason(exc)}")
    note = f"saved a snapshot of the {len(tokens)}-token prefix ({size:,} bytes)"
    if evicted:
        note += f"; evicted {len(evicted)} older snapshot(s) to stay under the cap"
    return SaveResult(path, size, len(tokens), tuple(evicted), note)


def _file_parts(key: SnapshotKey, tokens: Sequence[int], state: bytes | bytearray,
                kv_type: str) -> tuple[bytes | bytearray, ...]:
    header = json.dumps({
        "model_identity": key.model_identity, "n_ctx": key.n_ctx,
        "llama_cpp_version": key.llama_cpp_version, "cache_type": kv_type,
        "token_count": len(tokens),
        "prefix_sha256": prefix_hash(tokens), "state_bytes": len(state),
        "state_crc32": zlib.crc32(state), "created_at": int(time.time()),
    }, sort_keys=True).encode()
    return (_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)), header, _token_bytes(tokens),
            state)


def _read_exactly(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise _Refused("the file is truncated")
    return data


@dataclass(frozen=True)
class _Header:
    token_count: int
    state_bytes: int
    state_crc32: int
    prefix_sha256: str


def _read_header(handle: BinaryIO, key: SnapshotKey, indexed_hash: str,
                 kv_type: str) -> _Header:
    """Check the preamble and header against `key` and the file's size."""
    magic, version, header_size = _PREAMBLE.unpack(_read_exactly(handle, _PREAMBLE.size))
    if magic != MAGIC:
        raise _Refused("not a localchat snapshot file")
    if version != FORMAT_VERSION:
        raise _Refused(f"snapshot format {version}, this localchat reads {FORMAT_VERSION}")
    if header_size > _MAX_HEADER_BYTES:
        raise _Refused("the header is damaged")
    try:
        fields = json.loads(_read_exactly(handle, header_size))
        header = _Header(int(fields["token_count"]), int(fields["state_bytes"]),
                         int(fields["state_crc32"]), str(fields["prefix_sha256"]))
        checks = [
            (fields["model_identity"] == key.model_identity, "it was made with another model"),
            (fields["n_ctx"] == key.n_ctx,
             f"it was made with context size {fields['n_ctx']}, not {key.n_ctx}"),
            (fields["llama_cpp_version"] == key.llama_cpp_version,
             f"it was made by llama-cpp-python {fields['llama_cpp_version']}, "
             f"this is {key.llama_cpp_version}"),
            (fields.get("cache_type", "f16") == kv_type,
             f"it holds a {fields.get('cache_type', 'f16')} KV cache and this model was loaded "
             f"with --cache-type {kv_type}"),
            (header.prefix_sha256 == indexed_hash, "the file does not match its index entry"),
            (0 < header.token_count < key.n_ctx and header.state_bytes > 0,
             "the header is damaged"),
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise _Refused("the header is damaged") from exc
    for ok, reason in checks:
        if not ok:
            raise _Refused(reason)
    expected = _PREAMBLE.size + header_size + 4 * header.token_count + header.state_bytes
    actual = os.fstat(handle.fileno()).st_size
    if actual != expected:
        raise _Refused("the file is truncated" if actual < expected else "the file has extra bytes")
    return header


def _read_tokens(handle: BinaryIO, header: _Header) -> list[int]:
    raw = _read_exactly(handle, 4 * header.token_count)
    if hashlib.sha256(raw).hexdigest() != header.prefix_sha256:
        raise _Refused("its tokens are corrupt")
    return list(struct.unpack(f"<{header.token_count}i", raw))


@contextlib.contextmanager
def _mapped_state(handle: BinaryIO, header: _Header) -> Iterator[memoryview]:
    """The checked state bytes, mapped rather than read: no second copy of tens of MB."""
    # ACCESS_COPY because ctypes wants a writable buffer; nothing writes, so no page is copied.
    # The file is never truncated in place (writers rename a new file over it), so the mapping
    # cannot lose its pages while in use.
    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    whole = memoryview(mapping)
    state = whole[handle.tell(): handle.tell() + header.state_bytes]
    try:
        if zlib.crc32(state) != header.state_crc32:
            raise _Refused("its KV cache data is corrupt")
        yield state
    finally:
        state.release()
        whole.release()
        mapping.close()


def _write_atomically(path: Path, parts: Sequence[bytes | bytearray]) -> None:
    """Write to a private temp file, fsync it, then rename: readers see all or nothing."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # the rename is done; only its durability across power loss is uncertain
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_stale_temp_files(directory: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_S
    for temp in directory.glob(".*.tmp"):
        try:
            if temp.stat().st_mtime < cutoff:
                temp.unlink()
        except OSError:
            pass  # another process got there first, or it is not ours to remove


def _reason(exc: BaseException) -> str:
    if isinstance(exc, LocalchatError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc)
