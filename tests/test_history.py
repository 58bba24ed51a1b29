"""The history store: real SQLite files, migrations, privacy, search, faults and SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from localchat import paths
from localchat.errors import LocalchatError, UsageError
from localchat.history import database as history_db
from localchat.history import records as history
from localchat.history.records import open_history

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path):
    with open_history(tmp_path / "history.db") as opened:
        yield opened


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Opening, migrations, files


def test_a_version_1_database_gains_the_reasoning_column_and_keeps_its_messages(tmp_path):
    db = tmp_path / "history.db"
    raw = sqlite3.connect(db)
    for statement in history_db.MIGRATIONS[0]:
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO conversations (model, created_at, updated_at) VALUES ('m', 0, 0)")
    raw.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                " VALUES (1, 'assistant', 'old answer', 0)")
    raw.commit()
    raw.close()
    with open_history(db) as store:
        assert [(m.content, m.reasoning) for m in store.messages(1)] == [("old answer", None)]
        store.add_message(1, "user", "Is 391 prime?")
        store.add_message(1, "assistant", "No: 17 x 23.", reasoning="Try 17: 17 x 23 = 391.")
        assert store.messages(1)[-1].reasoning == "Try 17: 17 x 23 = 391."
        markdown = store.export_conversation(1, "md")
        assert "> **Thinking**\n>\n> Try 17: 17 x 23 = 391.\n\nNo: 17 x 23." in markdown
        exported = json.loads(store.export_conversation(1, "json"))
        assert exported["messages"][-1]["reasoning"] == "Try 17: 17 x 23 = 391."


def test_a_new_database_lives_in_the_data_dir_in_wal_mode_at_the_latest_schema():
    with open_history() as store:
        assert store.path == paths.data_dir() / "history.db"
    raw = sqlite3.connect(paths.data_dir() / "history.db")
    assert raw.execute("PRAGMA user_version").fetchone()[0] == history_db.SCHEMA_VERSION == 3
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
    assert {"conversations", "messages", "messages_fts", "snapshots", "prefix_snapshots"} <= names
    raw.close()


def test_migrations_run_once_each_and_a_failing_one_changes_nothing(tmp_path, monkeypatch):
    db = tmp_path / "history.db"
    with open_history(db) as store:
        kept = store.create_conversation("smollm2", name="kept")
    step_two = ("CREATE TABLE extra (x)", "INSERT INTO extra VALUES (1)")
    monkeypatch.setattr(history_db, "MIGRATIONS", [*history_db.MIGRATIONS, step_two])
    latest = history_db.SCHEMA_VERSION + 1
    for _ in range(2):  # the second open must not run the new step again
        with open_history(db) as store:
            assert store.find_conversation("kept") == kept
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == latest
    assert raw.execute("SELECT x FROM extra").fetchall() == [(1,)]
    raw.close()

    broken = ("CREATE TABLE half_done (x)", "SELECT * FROM no_such_table")
    monkeypatch.setattr(history_db, "MIGRATIONS", [*history_db.MIGRATIONS, broken])
    with pytest.raises(LocalchatError, match="no such table"):
        open_history(db)
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == latest
    assert not raw.execute("SELECT * FROM sqlite_master WHERE name = 'half_done'").fetchall()
    raw.close()


def test_database_files_are_private_whatever_the_umask():
    previous = os.umask(0)
    try:
        with open_history() as store:
            conversation = store.create_conversation("smollm2")
            store.add_message(conversation.id, "user", "a secret")
            files = [store.path, Path(f"{store.path}-wal"), Path(f"{store.path}-shm")]
            assert [mode(path) for path in files] == [0o600] * 3
            assert mode(paths.data_dir()) == 0o700
    finally:
        os.umask(previous)


# Conversations and messages


def test_a_named_conversation_is_resumed_with_every_field_after_reopening(tmp_path):
    db = tmp_path / "history.db"
    with open_history(db) as store:
        other = store.create_conversation("qwen2.5:1.5b")
        trip = store.create_conversation(
            "smollm2", system_prompt="Be brief.", settings={"temperature": 0.2}, name="trip-plan"
        )
        store.add_message(trip.id, "user", "Plan  a\ntrip to Oslo")
        answer = store.add_message(
            trip.id,
            "assistant",
            "Take the train.",
            token_count=4,
            timings={"tokens_per_second": 31.5},
            interrupted=True,
        )
        store.add_message(other.id, "user", "hello")
        store.add_message(trip.id, "user", "And then?")

    with open_history(db) as store:
        resumed = store.find_conversation("trip-plan")
        assert resumed == trip.__class__(**{**trip.__dict__, "updated_at": resumed.updated_at})
        assert resumed.updated_at > trip.updated_at
        assert store.find_conversation(str(trip.id)) == resumed == store.find_conversation(trip.id)
        assert store.find_conversation("nope") is None
        assert store.find_conversation("999") is None
        assert store.last_conversation() == resumed
        transcript = store.messages(trip.id)
        assert [(m.role, m.content) for m in transcript] == [
            ("user", "Plan  a\ntrip to Oslo"),
            ("assistant", "Take the train."),
            ("user", "And then?"),
        ]
        assert transcript[1] == answer
        assert transcript[1].timings == {"tokens_per_second": 31.5}
        assert transcript[1].interrupted and not transcript[0].interrupted
        summaries = store.list_conversations()
        assert [(s.id, s.name, s.model, s.turn_count, s.last_message) for s in summaries] == [
            (trip.id, "trip-plan", "smollm2", 2, "And then?"),
            (other.id, None, "qwen2.5:1.5b", 1, "hello"),
        ]
        assert len(store.list_conversations(limit=1)) == 1


def test_list_previews_the_last_message_on_one_short_line(store):
    conversation = store.create_conversation("smollm2")
    store.add_message(conversation.id, "assistant", "word\n" * 100)
    (summary,) = store.list_conversations()
    assert "\n" not in summary.last_message
    assert len(summary.last_message) == history.PREVIEW_CHARS
    assert summary.last_message.endswith("…")


def test_renaming_settings_and_system_prompt(store):
    conversation = store.create_conversation("smollm2", settings={"temperature": 0.7, "seed": 1})
    store.create_conversation("smollm2", name="taken")
    assert store.rename_conversation(conversation.id, "mine").name == "mine"
    assert store.find_conversation("mine").id == conversation.id
    with pytest.raises(UsageError, match="exists already"):
        store.rename_conversation(conversation.id, "taken")
    with pytest.raises(UsageError, match="exists already"):
        store.create_conversation("smollm2", name="mine")
    assert store.set_system_prompt(conversation.id, "Be kind.").system_prompt == "Be kind."
    updated = store.update_settings(conversation.id, {"temperature": 0.0, "top_k": 40})
    assert updated.settings == {"temperature": 0.0, "seed": 1, "top_k": 40}
    assert store.rename_conversation(conversation.id, None).name is None
    with pytest.raises(LocalchatError, match="no conversation"):
        store.set_system_prompt(999, "x")


@pytest.mark.parametrize(
    "name",
    [
        "../etc",
        "a/b",
        "a\\b",
        "C:drive",
        "",
        "x" * 65,
        "42",
        ".hidden",
        "..",
        "two words",
        "naïve",
        "tab\there",
        "semi;colon",
    ],
)
def test_names_that_could_be_paths_ids_or_odd_text_are_refused(store, name):
    with pytest.raises(UsageError, match="invalid conversation name"):
        store.create_conversation("smollm2", name=name)
    assert store.list_conversations() == []


@pytest.mark.parametrize("name", ["trip-plan", "v1.2_draft", "x" * 64, "2024-notes", "A"])
def test_ordinary_names_are_accepted(store, name):
    created = store.create_conversation("smollm2", name=name)
    assert store.find_conversation(name) == created


def test_a_message_for_a_missing_conversation_or_with_an_unknown_role_is_refused(store):
    with pytest.raises(LocalchatError, match="no conversation 7"):
        store.add_message(7, "user", "hi")
    conversation = store.create_conversation("smollm2")
    with pytest.raises(ValueError, match="role"):
        store.add_message(conversation.id, "robot", "hi")
    assert store.messages(conversation.id) == []


def test_undo_and_retry_remove_the_right_messages(store):
    conversation = store.create_conversation("smollm2")
    other = store.create_conversation("smollm2")
    added = [
        store.add_message(conversation.id, role, text)
        for role, text in [("user", "one"), ("assistant", "1"), ("user", "two"), ("assistant", "2")]
    ]
    store.add_message(other.id, "user", "untouched")
    assert store.delete_last_exchange(conversation.id) == added[2:]
    assert store.messages(conversation.id) == added[:2]
    assert store.delete_messages_after(added[0].id) == 1  # /retry: keep the question
    assert store.messages(conversation.id) == added[:1]
    assert store.delete_last_exchange(conversation.id) == added[:1]
    assert store.delete_last_exchange(conversation.id) == []
    assert [m.content for m in store.messages(other.id)] == ["untouched"]
    assert store.search("two") == []


# Search


def test_search_finds_words_stemmed_and_across_conversations(store):
    bread = store.create_conversation("smollm2", name="bread")
    trip = store.create_conversation("smollm2")
    store.add_message(bread.id, "user", 'How do I bake "sourdough" bread?')
    store.add_message(bread.id, "assistant", "Feed the starter, then bake at 250 °C.")
    store.add_message(trip.id, "user", "Trains from Oslo to Bergen")
    hits = store.search("sourdough")
    assert [(h.conversation_name, h.role) for h in hits] == [("bread", "user")]
    [(start, end)] = hits[0].matches
    assert hits[0].snippet[start:end] == "sourdough" and "**" not in hits[0].snippet
    assert {h.message_id for h in store.search("baking")} == {1, 2}
    assert [h.conversation_id for h in store.search("oslo bergen")] == [trip.id]
    assert store.search("oslo sourdough") == []
    assert len(store.search("bake", limit=1)) == 1


def test_search_spans_mark_the_matches_and_the_text_own_stars_stay_text(store):
    chat = store.create_conversation("smollm2")
    store.add_message(chat.id, "assistant", "Use **bold** text:\n\n  bold   words\tstand out.")
    [hit] = store.search("bold")
    assert hit.snippet == "Use **bold** text: bold words stand out."  # one line
    assert [hit.snippet[start:end] for start, end in hit.matches] == ["bold", "bold"]


@pytest.mark.parametrize(
    "query",
    [
        '"sourdough',
        'sourdough"',
        "bread's",
        "AND",
        "OR sourdough",
        "NEAR(",
        "*",
        "sour*",
        "-sourdough",
        "content:sourdough",
        "^bread",
        "(bread",
        "bread)",
        "{x}",
        "a + b",
        "'",
        "",
        "   ",
        '""',
        "!!!",
        "NOT bread",
        "250 °C",
    ],
)
def test_search_treats_quotes_and_operators_as_plain_text(store, query):
    conversation = store.create_conversation("smollm2")
    store.add_message(conversation.id, "user", 'How do I bake "sourdough" bread at 250 °C?')
    hits = store.search(query)
    assert isinstance(hits, list)
    if query in ('"sourdough', 'sourdough"', "-sourdough", "(bread", "bread)", "250 °C"):
        assert len(hits) == 1


def test_full_text_index_follows_deletes_and_cascades(store):
    conversation = store.create_conversation("smollm2", name="gone")
    store.add_message(conversation.id, "user", "ephemeral words")
    assert store.search("ephemeral")
    store.delete_conversation("gone")
    assert store.search("ephemeral") == []
    raw = sqlite3.connect(store.path)
    raw.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
    assert raw.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    raw.close()


# Export and delete


def test_export_as_markdown_and_json(store):
    conversation = store.create_conversation("smollm2", system_prompt="Be brief.", name="trip")
    store.add_message(conversation.id, "user", "Where to?")
    store.add_message(conversation.id, "assistant", "Bergen", interrupted=True, token_count=2)
    markdown = store.export_conversation("trip", "md")
    assert markdown.startswith("# trip\n")
    assert "- model: smollm2" in markdown
    order = [
        "## System",
        "Be brief.",
        "## User",
        "Where to?",
        "## Assistant",
        "Bergen",
        "*(interrupted)*",
    ]
    positions = [markdown.index(part) for part in order]
    assert positions == sorted(positions)
    data = json.loads(store.export_conversation(conversation.id, "json"))
    assert data["name"] == "trip" and data["system_prompt"] == "Be brief."
    assert [(m["role"], m["content"], m["interrupted"]) for m in data["messages"]] == [
        ("user", "Where to?", False),
        ("assistant", "Bergen", True),
    ]
    assert data["messages"][1]["token_count"] == 2
    assert data["created_at"].endswith("+00:00")
    with pytest.raises(UsageError, match="format"):
        store.export_conversation("trip", "html")
    with pytest.raises(LocalchatError, match="no conversation 'nope'"):
        store.export_conversation("nope", "md")


def test_delete_removes_the_conversation_its_messages_and_its_snapshot_files(store, tmp_path):
    doomed = store.create_conversation("smollm2", name="doomed")
    kept = store.create_conversation("smollm2", name="kept")
    store.add_message(doomed.id, "user", "bye")
    store.add_message(kept.id, "user", "stay")
    doomed_file = write_snapshot(tmp_path / "doomed.state", 10)
    kept_file = write_snapshot(tmp_path / "kept.state", 10)
    store.record_snapshot(doomed.id, doomed_file, "model-a", 2048, "0.3.36", "h", 5)
    store.record_snapshot(kept.id, kept_file, "model-a", 2048, "0.3.36", "h", 5)
    assert store.delete_conversation("doomed") == [doomed_file]
    assert not doomed_file.exists() and kept_file.exists()
    assert store.find_conversation("doomed") is None
    assert store.find_snapshot(doomed.id, "model-a", 2048, "0.3.36") is None
    assert store.find_snapshot(kept.id, "model-a", 2048, "0.3.36") is not None
    assert [m.content for m in store.messages(kept.id)] == ["stay"]
    assert store.messages(doomed.id) == []
    with pytest.raises(LocalchatError, match="no conversation"):
        store.delete_conversation("doomed")


# Snapshot index


def write_snapshot(path: Path, size: int) -> Path:
    path.write_bytes(b"s" * size)
    return path.resolve()


def test_snapshots_are_found_only_for_the_same_model_context_and_llama_cpp(store, tmp_path):
    conversation = store.create_conversation("smollm2")
    snapshot_file = write_snapshot(tmp_path / "one.state", 123)
    recorded = store.record_snapshot(
        conversation.id, snapshot_file, "model-a", 2048, "0.3.36", "abc123", 77
    )
    assert (recorded.path, recorded.size_bytes, recorded.token_count, recorded.prefix_hash) == (
        snapshot_file,
        123,
        77,
        "abc123",
    )
    assert store.find_snapshot(conversation.id, "model-a", 2048, "0.3.36") == recorded
    assert store.find_snapshot(conversation.id, "model-b", 2048, "0.3.36") is None
    assert store.find_snapshot(conversation.id, "model-a", 4096, "0.3.36") is None
    assert store.find_snapshot(conversation.id, "model-a", 2048, "0.3.37") is None

    newer_file = write_snapshot(tmp_path / "two.state", 200)
    newer = store.record_snapshot(
        conversation.id, newer_file, "model-a", 2048, "0.3.36", "def456", 99
    )
    assert not snapshot_file.exists(), "a replaced snapshot's file is deleted"
    assert store.find_snapshot(conversation.id, "model-a", 2048, "0.3.36") == newer

    newer_file.unlink()
    assert store.find_snapshot(conversation.id, "model-a", 2048, "0.3.36") is None
    raw = sqlite3.connect(store.path)
    assert raw.execute("SELECT count(*) FROM snapshots").fetchone() == (0,)
    raw.close()


def test_eviction_removes_least_recently_used_snapshots_until_under_the_cap(store, tmp_path):
    conversations = [store.create_conversation("smollm2") for _ in range(4)]
    records = []
    for index, conversation in enumerate(conversations):
        snapshot_file = write_snapshot(tmp_path / f"{index}.state", 100)
        records.append(
            store.record_snapshot(conversation.id, snapshot_file, "m", 2048, "v", "h", 10)
        )
        time.sleep(0.002)  # distinct last_used_at even on a coarse clock
    store.touch_snapshot(records[0].id)  # now the most recently used
    records[3].path.unlink()  # a row whose file vanished is dropped, not counted
    assert store.evict_snapshots(cap_bytes=1000) == []
    assert store.evict_snapshots(cap_bytes=150) == [records[1].path, records[2].path]
    assert [r.path.exists() for r in records] == [True, False, False, False]
    remaining = [store.find_snapshot(c.id, "m", 2048, "v") is not None for c in conversations]
    assert remaining == [True, False, False, False]
    assert store.evict_snapshots(cap_bytes=0) == [records[0].path]
    raw = sqlite3.connect(store.path)
    assert raw.execute("SELECT count(*) FROM snapshots").fetchone() == (0,)
    raw.close()


# Files we must not touch


def garbled_database(path: Path) -> None:
    """A real history database whose pages after the header were overwritten."""
    with open_history(path) as store:
        conversation = store.create_conversation("smollm2")
        for index in range(50):
            store.add_message(conversation.id, "user", f"message {index} " * 20)
    data = bytearray(path.read_bytes())
    data[100:] = random.Random(1).randbytes(len(data) - 100)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["random bytes", "garbled pages", "short file"])
def test_a_corrupt_database_is_refused_and_left_byte_for_byte(tmp_path, kind):
    db = tmp_path / "history.db"
    if kind == "random bytes":
        db.write_bytes(random.Random(0).randbytes(64 * 1024))
    elif kind == "garbled pages":
        garbled_database(db)
    else:
        db.write_bytes(b"SQLite")
    before = sha256(db)
    with pytest.raises(LocalchatError) as raised:
        open_history(db)
    assert str(db) in raised.value.message
    assert "damaged" in raised.value.message and "left untouched" in raised.value.message
    assert "move it aside" in raised.value.hint
    assert sha256(db) == before


@pytest.mark.parametrize("crashed", [False, True], ids=["closed", "crashed with a full WAL"])
def test_a_database_from_a_newer_localchat_is_refused_and_left_byte_for_byte(tmp_path, crashed):
    source = tmp_path / "source" / "history.db"
    with open_history(source) as store:
        store.create_conversation("smollm2", name="future")
    raw = sqlite3.connect(source, isolation_level=None)
    raw.execute("PRAGMA wal_autocheckpoint = 0")
    raw.execute(f"PRAGMA user_version = {history_db.SCHEMA_VERSION + 1}")
    raw.execute("INSERT INTO conversations (model, created_at, updated_at) VALUES ('m', 0, 0)")
    db = tmp_path / "history.db"
    # Copying while the connection is open captures the files as a crash would leave them;
    # a writable connection would fold that WAL into the file on close, changing its bytes.
    for suffix in ["", "-wal", "-shm"] if crashed else []:
        shutil.copyfile(f"{source}{suffix}", f"{db}{suffix}")
    raw.close()
    if not crashed:
        shutil.copyfile(source, db)
    before = sha256(db)
    with pytest.raises(LocalchatError) as raised:
        open_history(db)
    message = raised.value.message
    assert str(db) in message and "newer" in message and "left untouched" in message
    assert "upgrade localchat" in raised.value.hint
    assert sha256(db) == before


def test_a_busy_database_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(history_db, "BUSY_TIMEOUT_S", 0.05)
    with open_history(tmp_path / "history.db") as store:
        conversation = store.create_conversation("smollm2")
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(LocalchatError, match="busy"):
            store.add_message(conversation.id, "user", "hello")
        other.execute("ROLLBACK")
        other.close()
        store.add_message(conversation.id, "user", "hello")


@pytest.fixture
def read_only_dir():
    # Under /tmp rather than tmp_path: `nobody` cannot enter pytest's private base dir.
    directory = Path(tempfile.mkdtemp(prefix="localchat-ro-"))
    yield directory
    directory.chmod(0o700)
    shutil.rmtree(directory)


def make_read_only(directory: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody").pw_uid
        for path in [directory, *directory.iterdir()]:
            os.chown(path, nobody, -1)
    directory.chmod(0o500)


def test_a_read_only_data_dir_gives_a_clear_error_and_creates_nothing(read_only_dir,
                                                                     as_unprivileged_user):
    make_read_only(read_only_dir)
    with as_unprivileged_user(), pytest.raises(LocalchatError) as raised:
        open_history(read_only_dir / "data" / "history.db")
    assert f"cannot write the history in {read_only_dir / 'data'}" in raised.value.message
    assert "--no-history" in raised.value.hint
    assert list(read_only_dir.iterdir()) == []


def test_an_existing_history_in_a_read_only_dir_gives_a_clear_error_untouched(
        read_only_dir, as_unprivileged_user):
    db = read_only_dir / "history.db"
    with open_history(db) as store:
        store.create_conversation("smollm2", name="kept")
    before = sha256(db)
    make_read_only(read_only_dir)
    with as_unprivileged_user(), pytest.raises(LocalchatError) as raised:
        open_history(db)
    assert f"cannot write the history in {read_only_dir}" in raised.value.message
    assert "--no-history" in raised.value.hint
    assert sha256(db) == before
    assert [path.name for path in read_only_dir.iterdir()] == ["history.db"]


# Crashes

CHILD = r"""
import sys
from pathlib import Path
from localchat.history.records import open_history

trial = int(sys.argv[2])
with open_history(Path(sys.argv[1])) as store:
    conversation = store.create_conversation("smollm2", name=f"trial-{trial}")
    print("conversation", conversation.id, flush=True)
    index = 0
    while True:
        role = "user" if index % 2 == 0 else "assistant"
        content = f"trial {trial} message {index} " + "word " * (index % 40)
        message = store.add_message(conversation.id, role, content, token_count=index)
        print("committed", message.id, index, flush=True)
        index += 1
"""
TRIALS = 24


def expected_content(trial: int, index: int) -> str:
    return f"trial {trial} message {index} " + "word " * (index % 40)


@pytest.mark.slow  # no model, but 20 processes killed one by one: several seconds
def test_sigkill_at_random_moments_never_loses_a_committed_message_or_corrupts(tmp_path):
    db = tmp_path / "history.db"
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    committed: dict[int, list[str]] = {}  # conversation id -> contents the child reported
    for trial in range(TRIALS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(trial)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        first_line = ""
        if trial % 4 == 0:
            # Python starts in ~0.1 s and opens the store by ~0.2 s: this lands kills in
            # imports, schema creation, the first insert, and a few into the loop.
            time.sleep(rng.uniform(0.1, 0.3))
        else:
            first_line = child.stdout.readline()  # the child is writing from here on
            time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        # Read through the same buffered files as readline did, so no buffered line is lost.
        output, errors = child.stdout.read(), child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        assert child.returncode == -signal.SIGKILL, f"child failed on its own: {errors}"
        lines = (first_line + output).split("\n")[:-1]  # the last piece may be half-written
        header = [line for line in lines if line.startswith("conversation ")]
        if header:
            conversation_id = int(header[0].split()[1])
            reported = [line.split() for line in lines if line.startswith("committed ")]
            assert [int(index) for _, _, index in reported] == list(range(len(reported)))
            committed[conversation_id] = [expected_content(trial, i) for i in range(len(reported))]

        context = f"trial {trial}, seed {seed}"
        raw = sqlite3.connect(db)  # first, so it sees the file exactly as the kill left it
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)], context
        raw.close()
        with open_history(db) as store:  # a kill before the schema was committed left none
            store._db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
            for conversation_id, contents in committed.items():
                stored = [m.content for m in store.messages(conversation_id)]
                # The child may be killed after a commit and before it says so: one extra at most.
                assert stored[: len(contents)] == contents, context
                assert len(stored) - len(contents) in (0, 1), context
    assert sum(len(contents) for contents in committed.values()) > TRIALS, "kills came too soon"
