"""KV-cache snapshots with the real model: save, restore in a fresh engine, bad files, LRU."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import time
import zlib
from pathlib import Path

import pytest

from localchat.engine.local import LocalEngine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.history import snapshots
from localchat.history.records import open_history
from localchat.history.snapshots import restore_snapshot, save_snapshot, snapshot_key
from localchat.models.gguf_reader import read_model_file

pytestmark = pytest.mark.slow

# Greedy and short; one thread, because spinning llama.cpp threads on a busy CPU are very slow.
GREEDY = Sampling(temperature=0.0, max_tokens=16)
FIRST = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"}]
SECOND = {"role": "user", "content": "And what is the capital of Italy?"}


def load(model_path: Path, n_ctx: int = 1024, flash_attn: bool = True) -> LocalEngine:
    return LocalEngine(EngineOptions(model_path=model_path, n_ctx=n_ctx, threads=1,
                                     flash_attn=flash_attn), read_model_file(model_path))


def reply(engine: LocalEngine, messages: list[dict[str, str]]) -> str:
    return "".join(engine.stream(messages, GREEDY))


@pytest.fixture(scope="module")
def live(smollm2_path):
    """A two-turn conversation run in one engine: the KV state after turn one, then turn two."""
    engine = load(smollm2_path)
    first_reply = reply(engine, FIRST)
    tokens, state = engine.export_state()
    history = [*FIRST, {"role": "assistant", "content": first_reply}]
    second_reply = reply(engine, [*history, SECOND])
    yield {"tokens": tokens, "state": bytes(state), "history": history,
           "second_reply": second_reply, "second_stats": engine.last_stats}
    engine.close()


@pytest.fixture(scope="module")
def engine(smollm2_path):
    loaded = load(smollm2_path)
    yield loaded
    loaded.close()


@pytest.fixture
def store():
    with open_history() as opened:
        yield opened


@pytest.fixture
def saved(engine, store, live):
    """A conversation in the history with a snapshot of its first turn; the engine is reset."""
    conversation = store.create_conversation("smollm2", system_prompt=FIRST[0]["content"])
    for message in live["history"][1:]:
        store.add_message(conversation.id, message["role"], message["content"])
    engine.import_state(live["tokens"], bytearray(live["state"]))
    result = save_snapshot(engine, store, conversation.id)
    engine.reset_cache()
    assert result.path is not None, result.note
    return conversation.id, result


def test_a_snapshot_is_a_private_file_in_the_cache_dir_indexed_by_the_history(saved, store,
                                                                             engine, live):
    conversation_id, result = saved
    assert result.path.parent == snapshots.snapshot_dir()
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
    assert result.path.stat().st_size == result.size_bytes
    assert result.token_count == len(live["tokens"])
    assert [p.name for p in result.path.parent.iterdir()] == [result.path.name]  # no temp left
    key = snapshot_key(engine)
    record = store.find_snapshot(conversation_id, *vars(key).values())
    assert record.path == result.path.resolve()
    assert record.prefix_hash == snapshots.prefix_hash(live["tokens"])
    assert record.token_count == len(live["tokens"]) and record.size_bytes == result.size_bytes


def test_restoring_in_a_fresh_engine_skips_the_history_and_replies_as_if_never_closed(
        saved, store, smollm2_path, live, engine):
    conversation_id, _ = saved
    messages = [*live["history"], SECOND]
    fresh = load(smollm2_path)
    try:
        result = restore_snapshot(fresh, store, conversation_id, messages)
        assert result.restored, result.note
        text = reply(fresh, messages)
        stats = fresh.last_stats
    finally:
        fresh.close()
    # The whole first turn came from the snapshot: only the new user turn was processed.
    assert stats.cached_tokens == result.reused_tokens == live["second_stats"].cached_tokens
    assert stats.cached_tokens == len(live["tokens"])
    assert stats.prefill_tokens == stats.prompt_tokens - len(live["tokens"]) <= 20
    # Same KV cache, same greedy reply as the engine that never stopped...
    assert text == live["second_reply"]
    # ...and as re-reading the whole history (the KV values differ in the last bits, since
    # llama.cpp batched the tokens differently, but not enough to change a confident answer).
    assert reply(engine, messages) == text and engine.last_stats.cached_tokens == 0
    assert "Rome" in text
    assert "resumed from a snapshot" in result.note


def test_restore_marks_the_snapshot_as_recently_used(saved, store, engine, live):
    conversation_id, _ = saved
    key = vars(snapshot_key(engine)).values()
    before = store.find_snapshot(conversation_id, *key).last_used_at
    time.sleep(0.01)
    assert restore_snapshot(engine, store, conversation_id, live["history"]).restored
    assert store.find_snapshot(conversation_id, *key).last_used_at > before


def test_a_conversation_without_a_snapshot_says_so(engine, store, live):
    conversation = store.create_conversation("smollm2")
    result = restore_snapshot(engine, store, conversation.id, live["history"])
    assert not result.restored and result.reused_tokens == 0
    assert "no snapshot" in result.note


def test_a_snapshot_of_another_history_is_not_loaded(saved, store, engine):
    conversation_id, _ = saved
    other = [{"role": "user", "content": "Write a haiku about the sea."}]
    result = restore_snapshot(engine, store, conversation_id, other)
    assert not result.restored
    assert "does not match" in result.note
    assert engine._llama.n_tokens == 0  # nothing was loaded


def damage(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def layout(path: Path) -> tuple[int, int]:
    """(offset of the tokens, offset of the state) in a snapshot file."""
    _, _, header_size = struct.unpack("<8sII", path.read_bytes()[:16])
    header = json.loads(path.read_bytes()[16:16 + header_size])
    tokens_at = 16 + header_size
    return tokens_at, tokens_at + 4 * header["token_count"]


@pytest.mark.parametrize("how, expected", [
    ("truncate", "truncated"),
    ("extend", "extra bytes"),
    ("state", "KV cache data is corrupt"),
    ("tokens", "tokens are corrupt"),
    ("header", "header is damaged"),
    ("magic", "not a localchat snapshot"),
    ("empty", "truncated"),
])
def test_a_damaged_snapshot_is_ignored_with_a_note_and_the_engine_still_works(
        saved, store, engine, live, how, expected):
    conversation_id, result = saved
    path = result.path
    tokens_at, state_at = layout(path)
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, size - 1000)
    elif how == "extend":
        with path.open("ab") as handle:
            handle.write(b"\0")
    elif how == "state":
        damage(path, state_at + (size - state_at) // 2, b"\xff\xfe\xfd\xfc")
    elif how == "tokens":
        damage(path, tokens_at + 8, b"\x7f\x7f\x7f\x7f")
    elif how == "header":
        damage(path, 16, b"{{{{")
    elif how == "magic":
        damage(path, 0, b"GGUF")
    else:
        os.truncate(path, 0)
    outcome = restore_snapshot(engine, store, conversation_id, [*live["history"], SECOND])
    assert not outcome.restored and outcome.reused_tokens == 0
    assert expected in outcome.note and "re-read" in outcome.note
    if how == "state":  # the costly path: the history is processed again, the reply is normal
        assert reply(engine, [*live["history"], SECOND]).strip()
        assert engine.last_stats.cached_tokens == 0


def test_a_well_formed_file_whose_state_llama_cpp_refuses_is_ignored(saved, store, engine, live):
    conversation_id, result = saved
    data = result.path.read_bytes()
    _, _, header_size = struct.unpack("<8sII", data[:16])
    header = json.loads(data[16:16 + header_size])
    _, state_at = layout(result.path)
    state = data[state_at:state_at + (len(data) - state_at) // 2]  # half a KV cache
    header |= {"state_bytes": len(state), "state_crc32": zlib.crc32(state)}
    encoded = json.dumps(header).encode()
    result.path.write_bytes(data[:8] + struct.pack("<II", 1, len(encoded)) + encoded
                            + data[16 + header_size:state_at] + state)
    outcome = restore_snapshot(engine, store, conversation_id, [*live["history"], SECOND])
    assert not outcome.restored and "llama.cpp refused" in outcome.note
    assert engine._llama.n_tokens == 0
    assert restore_snapshot(engine, store, conversation_id, live["history"]).note == outcome.note


def test_a_snapshot_missing_from_disk_is_dropped_from_the_index(saved, store, engine, live):
    conversation_id, result = saved
    result.path.unlink()
    outcome = restore_snapshot(engine, store, conversation_id, live["history"])
    assert not outcome.restored and "no snapshot" in outcome.note
    assert store.find_snapshot(conversation_id, *vars(snapshot_key(engine)).values()) is None


def linked_model(smollm2_path: Path, directory: Path) -> Path:
    """The same weights under another path: another model identity, without copying 98 MB."""
    target = directory / "other-model.gguf"
    try:
        os.link(smollm2_path, target)
    except OSError:
        shutil.copyfile(smollm2_path, target)
    return target


def test_a_snapshot_from_another_model_or_context_size_is_not_used(saved, store, engine, live,
                                                                   smollm2_path, tmp_path):
    conversation_id, result = saved
    messages = [*live["history"], SECOND]
    others = (load(linked_model(smollm2_path, tmp_path)), load(smollm2_path, n_ctx=512),
              load(smollm2_path, flash_attn=False))  # another KV layout: V transposed
    expected_notes = ["another model", "context size 1024, not 512", "without flash attention"]
    for other, expected in zip(others, expected_notes, strict=True):
        try:
            # The index is keyed by model and n_ctx, so the lookup itself finds nothing...
            outcome = restore_snapshot(other, store, conversation_id, messages)
            assert not outcome.restored and "no snapshot" in outcome.note
            # ...and a file filed under the wrong key is refused by its own header.
            key = snapshot_key(other)
            store.record_snapshot(conversation_id, result.path, key.model_identity, key.n_ctx,
                                  key.llama_cpp_version, snapshots.prefix_hash(live["tokens"]),
                                  len(live["tokens"]))
            outcome = restore_snapshot(other, store, conversation_id, messages)
            assert not outcome.restored
            assert expected in outcome.note
            assert other._llama.n_tokens == 0
        finally:
            other.close()


def test_saving_again_replaces_the_file_and_an_empty_cache_saves_nothing(saved, store, engine,
                                                                         live):
    conversation_id, first = saved
    empty = save_snapshot(engine, store, conversation_id)  # the fixture reset the cache
    assert empty.path is None and "empty" in empty.note
    engine.import_state(live["tokens"], bytearray(live["state"]))
    again = save_snapshot(engine, store, conversation_id)
    assert again.path == first.path and again.token_count == first.token_count
    assert len(list(snapshots.snapshot_dir().iterdir())) == 1


def test_least_recently_used_snapshots_are_evicted_over_the_cap(engine, store, live):
    engine.import_state(live["tokens"], bytearray(live["state"]))
    ids = [store.create_conversation("smollm2").id for _ in range(3)]
    first = save_snapshot(engine, store, ids[0])
    size = first.size_bytes
    cap = 2 * size + size // 2  # room for two
    assert save_snapshot(engine, store, ids[1], cap_bytes=cap).evicted == ()
    key = vars(snapshot_key(engine)).values()
    store.touch_snapshot(store.find_snapshot(ids[0], *key).id)  # the oldest is now the newest
    third = save_snapshot(engine, store, ids[2], cap_bytes=cap)
    assert len(third.evicted) == 1 and "evicted 1" in third.note
    assert store.find_snapshot(ids[1], *key) is None
    assert store.find_snapshot(ids[0], *key) is not None
    assert store.find_snapshot(ids[2], *key) is not None
    assert sorted(snapshots.snapshot_dir().iterdir()) == sorted([first.path, third.path])
    too_small = save_snapshot(engine, store, ids[1], cap_bytes=size // 2)
    assert too_small.path is None and "over the" in too_small.note
    assert store.find_snapshot(ids[1], *key) is None


def test_deleting_the_conversation_removes_its_snapshot(saved, store):
    conversation_id, result = saved
    assert store.delete_conversation(conversation_id) == [result.path.resolve()]
    assert not result.path.exists()


def test_a_stale_temp_file_from_a_killed_save_is_cleaned_up(engine, store, live):
    directory = snapshots.snapshot_dir()
    directory.mkdir(parents=True)
    stale, fresh = directory / ".old.tmp", directory / ".busy.tmp"
    stale.write_bytes(b"half a snapshot")
    fresh.write_bytes(b"another process is writing this")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    engine.import_state(live["tokens"], bytearray(live["state"]))
    assert save_snapshot(engine, store, store.create_conversation("smollm2").id).path
    assert not stale.exists() and fresh.exists()


def test_an_unwritable_cache_dir_is_a_note_not_a_crash(engine, store, live):
    snapshots.snapshot_dir().parent.mkdir(parents=True, exist_ok=True)
    snapshots.snapshot_dir().write_text("a file where the directory should be")
    engine.import_state(live["tokens"], bytearray(live["state"]))
    result = save_snapshot(engine, store, store.create_conversation("smollm2").id)
    assert result.path is None and result.note.startswith("no snapshot saved")


def test_an_engine_without_a_local_cache_is_a_note():
    class Remote:
        pass

    assert "no local KV cache" in save_snapshot(Remote(), None, 1).note
    assert "no local KV cache" in restore_snapshot(Remote(), None, 1, []).note


def test_a_snapshot_of_a_conversation_deleted_meanwhile_leaves_no_file(engine, store, live):
    conversation = store.create_conversation("smollm2")
    with open_history() as elsewhere:  # `localchat history rm` in another terminal
        elsewhere.delete_conversation(conversation.id)
    engine.import_state(live["tokens"], bytearray(live["state"]))
    result = save_snapshot(engine, store, conversation.id)
    assert result.path is None and result.note.startswith("no snapshot saved: no conversation")
    assert list(snapshots.snapshot_dir().glob("*.kvsnap")) == []


def test_snapshot_files_no_conversation_owns_are_swept(saved, store, engine, live):
    _, kept = saved
    directory = snapshots.snapshot_dir()
    ours = kept.path.name.split("-conversation-")[0]
    orphan = directory / f"{ours}-conversation-99-0123456789abcdef.kvsnap"
    writing = directory / f"{ours}-conversation-98-0123456789abcdef.kvsnap"
    other_history = directory / "h00000000-conversation-99-0123456789abcdef.kvsnap"
    for path in (orphan, writing, other_history):
        path.write_bytes(b"kv")
    an_hour_ago = time.time() - 3600
    for path in (orphan, other_history):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert snapshots.sweep_orphans(store) == [orphan]
    assert not orphan.exists()
    assert kept.path.exists() and writing.exists() and other_history.exists()
    # Saving a snapshot sweeps too.
    os.utime(writing, (an_hour_ago, an_hour_ago))
    engine.import_state(live["tokens"], bytearray(live["state"]))
    assert save_snapshot(engine, store, store.create_conversation("smollm2").id).path
    assert not writing.exists() and other_history.exists()
