"""History from the command line: recording runs, `localchat history`, faults.

The command runs in-process (`run_cli`); Ctrl-C and SIGKILL need a real process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import random
import select
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from cli_runner import CliResult, run_cli

from localchat import paths
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.history import snapshots
from localchat.history.records import open_history
from localchat.oneshot import Request, run_once
from localchat.render import Environment

# Greedy and short; one thread, because spinning llama.cpp threads on a busy CPU are very slow.
RUN = ["--temperature", "0", "--max-tokens", "8", "--threads", "1", "--ctx", "512"]
KILL_TRIALS = 20


def assert_one_line_error(result: CliResult, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def db_file() -> Path:
    return paths.data_dir() / "history.db"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def transcripts() -> dict[str, list[dict]]:
    """Each conversation's messages, keyed by its first user message."""
    with open_history() as store:
        return {
            messages[0].content if messages else f"#{summary.id}": [
                {"role": m.role, "content": m.content, "token_count": m.token_count,
                 "timings": m.timings, "interrupted": m.interrupted} for m in messages]
            for summary in store.list_conversations(limit=1000)
            for messages in [store.messages(summary.id)]
        }


# Recording `localchat run`


@pytest.mark.slow
def test_a_run_records_the_exchange_with_its_counts_and_timings(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Name a fruit.", "--json", *RUN)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert stat.S_IMODE(db_file().stat().st_mode) == 0o600
    user, assistant = transcripts()["Name a fruit."]
    assert user["role"] == "user" and user["interrupted"] is False
    assert assistant["role"] == "assistant" and assistant["content"] == record["text"]
    assert assistant["token_count"] == record["completion_tokens"]
    assert assistant["timings"]["prompt_tokens"] == record["prompt_tokens"]
    assert assistant["timings"]["finish_reason"] == record["finish_reason"]
    assert assistant["timings"]["ttft_s"] > 0 and assistant["interrupted"] is False

    listing = run_cli("history")
    assert listing.exit_code == 0, listing.stderr
    header, row = listing.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "MODEL", "TURNS", "LAST", "MESSAGE", "UPDATED"]
    assert row.split()[:4] == ["1", "-", smollm2_path.name, "1"]  # a path by its file name
    shown = run_cli("history", "show", "1")
    assert "user:\nName a fruit.\n" in shown.stdout
    assert f"assistant:\n{record['text'].strip()}" in shown.stdout


@pytest.mark.slow
def test_no_history_flag_and_config_setting_write_nothing(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Say hi.", "--no-history", *RUN)
    assert result.exit_code == 0 and result.stdout.strip(), result.stderr
    assert not db_file().exists()
    paths.config_dir().mkdir(parents=True)
    paths.config_file().write_text("history = false\n")
    result = run_cli("run", str(smollm2_path), "Say hi.", *RUN)
    assert result.exit_code == 0 and result.stdout.strip(), result.stderr
    assert not db_file().exists()


@pytest.mark.slow
def test_an_interrupted_run_records_the_partial_reply_as_interrupted(smollm2_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "localchat", "run", str(smollm2_path), "Count to a hundred.",
         "--ignore-eos", *RUN, "--max-tokens", "300"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = read_first_byte(process)
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=60)
    assert process.returncode == 130, errors
    stdout = (first + rest).decode()
    _, assistant = transcripts()["Count to a hundred."]
    assert assistant["interrupted"] is True
    assert assistant["timings"]["finish_reason"] == "interrupted"
    assert assistant["content"].rstrip("\n") == stdout.rstrip("\n") != ""


@pytest.mark.slow
def test_an_unusable_data_dir_is_one_note_and_the_run_goes_on(smollm2_path):
    paths.data_dir().parent.mkdir(parents=True)
    paths.data_dir().write_text("a file where the data dir should be")
    result = run_cli("run", str(smollm2_path), "Say hi.", *RUN)
    assert result.exit_code == 0 and result.stdout.strip()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("note: not saved to the history: cannot write the history in")
    assert "--no-history" in lines[0]


@pytest.mark.slow
def test_a_corrupt_history_is_one_note_for_a_run_and_is_left_untouched(smollm2_path):
    db_file().parent.mkdir(parents=True)
    db_file().write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    before = sha256(db_file())
    result = run_cli("run", str(smollm2_path), "Say hi.", *RUN)
    assert result.exit_code == 0 and result.stdout.strip()
    assert result.stderr.count("\n") == 1 and "damaged" in result.stderr
    assert sha256(db_file()) == before


@pytest.mark.slow
def test_a_read_only_data_dir_is_one_note_and_the_run_goes_on(smollm2_path, monkeypatch,
                                                              as_unprivileged_user):
    # Under /tmp, not tmp_path, so that `nobody` can reach it; the model is linked in for the
    # same reason. In-process, because `nobody` cannot start this interpreter.
    home = Path(tempfile.mkdtemp(prefix="localchat-ro-"))
    try:
        home.chmod(0o755)
        model = home / "model.gguf"
        try:
            os.link(smollm2_path, model)
        except OSError:
            shutil.copyfile(smollm2_path, model)
        data = home / "data"
        data.mkdir()
        if os.geteuid() == 0:
            os.chown(data, pwd.getpwnam("nobody").pw_uid, -1)
        data.chmod(0o500)
        monkeypatch.setenv("LOCALCHAT_HOME", str(home))
        env = Environment(stdin=io.StringIO(""), stdout=io.StringIO(), stderr=io.StringIO())
        request = Request(model="smollm2", prompt="Say hi.", system=None,
                          sampling=Sampling(temperature=0.0, max_tokens=8),
                          engine=EngineOptions(model_path=model, n_ctx=512, threads=1),
                          history=True)
        # Once as ourselves first: `nobody` cannot read the interpreter's lazily imported modules.
        warm_up = replace(request, history=False, sampling=Sampling(temperature=0.0, max_tokens=1))
        assert run_once(warm_up, replace(env, stdout=io.StringIO())) == 0
        with as_unprivileged_user():
            code = run_once(request, env)
        assert code == 0 and env.stdout.getvalue().strip()
        assert env.stderr.getvalue() == (
            f"note: not saved to the history: cannot write the history in {data}: not writable "
            f"(make it writable (chmod u+w {data}) or run with --no-history)\n")
        assert list(data.iterdir()) == []
    finally:
        (home / "data").chmod(0o700)
        shutil.rmtree(home)


# `localchat history`


@pytest.fixture
def two_conversations():
    """A named conversation with a snapshot file, and a newer unnamed one."""
    with open_history() as store:
        trip = store.create_conversation("smollm2", system_prompt="Be brief.", name="trip-plan")
        store.add_message(trip.id, "user", "Plan a day in Lisbon with sourdough bakeries.")
        store.add_message(trip.id, "assistant", "Morning: a bakery in Alfama.", token_count=9)
        store.add_message(trip.id, "user", "And the evening?")
        store.add_message(trip.id, "assistant", "Fado in", interrupted=True)
        snapshot = paths.ensure_private_dir(snapshots.snapshot_dir()) / "trip.kvsnap"
        snapshot.write_bytes(b"kv")
        store.record_snapshot(trip.id, snapshot, "model", 512, "0.3", "hash", 1)
        time.sleep(0.01)
        other = store.create_conversation("qwen2.5:1.5b")
        store.add_message(other.id, "user", "hello")
        store.add_message(other.id, "assistant", "Hi! How can I help?")
    return trip.id, other.id, snapshot


def test_history_lists_recent_conversations_newest_first(two_conversations):
    trip_id, other_id, _ = two_conversations
    result = run_cli("history")
    assert result.exit_code == 0, result.stderr
    header, newer, older = result.stdout.splitlines()
    assert header.startswith("ID  NAME")
    assert newer.split()[:4] == [str(other_id), "-", "qwen2.5:1.5b", "1"]
    assert "Hi! How can I help?" in newer
    assert older.split()[:4] == [str(trip_id), "trip-plan", "smollm2", "2"]
    assert "Fado in" in older
    assert run_cli("history", "--limit", "1").stdout.count("\n") == 2


def test_history_show_prints_the_transcript_by_name_or_id(two_conversations):
    trip_id, _, _ = two_conversations
    by_name = run_cli("history", "show", "trip-plan")
    assert by_name.exit_code == 0, by_name.stderr
    assert by_name.stdout.startswith(f"conversation   trip-plan (id {trip_id})\nmodel          "
                                     "smollm2\n")
    assert "system prompt  Be brief.\n" in by_name.stdout
    assert by_name.stdout.endswith(
        "\nuser:\nPlan a day in Lisbon with sourdough bakeries.\n\nassistant:\nMorning: a bakery "
        "in Alfama.\n\nuser:\nAnd the evening?\n\nassistant: (interrupted)\nFado in\n\n")
    assert run_cli("history", "show", str(trip_id)).stdout == by_name.stdout


def test_history_search_finds_words_in_any_form(two_conversations):
    trip_id, _, _ = two_conversations
    result = run_cli("history", "search", "bakery")  # the message says "bakeries" and "bakery"
    assert result.exit_code == 0, result.stderr
    rows = result.stdout.splitlines()[1:]
    assert len(rows) == 2 and all(row.split()[:2] == [str(trip_id), "trip-plan"] for row in rows)
    assert "bakeries" in result.stdout and "bakery" in result.stdout
    assert "**" not in result.stdout  # emphasis is for a terminal (tests/test_cli_tables.py)
    none = run_cli("history", "search", "sourdough", "tokyo")
    assert none.exit_code == 0 and none.stdout == ""
    assert "nothing in the history matches" in none.stderr


def test_history_export_as_markdown_and_json(two_conversations):
    markdown = run_cli("history", "export", "trip-plan")
    assert markdown.exit_code == 0, markdown.stderr
    assert markdown.stdout.startswith("# trip-plan\n\n- model: smollm2\n")
    assert "## Assistant\n\nFado in\n\n*(interrupted)*" in markdown.stdout
    exported = json.loads(run_cli("history", "export", "trip-plan", "--format", "json").stdout)
    assert exported["name"] == "trip-plan" and exported["system_prompt"] == "Be brief."
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"] * 2
    assert exported["messages"][1]["token_count"] == 9
    bad = run_cli("history", "export", "trip-plan", "--format", "xml")
    assert_one_line_error(bad, 2, "unknown export format 'xml'")


def test_history_rm_deletes_the_conversation_and_its_snapshot(two_conversations):
    _, other_id, snapshot = two_conversations
    result = run_cli("history", "rm", "trip-plan")
    assert result.exit_code == 0, result.stderr
    assert "removed conversation trip-plan and 1 snapshot file(s)" in result.stderr
    assert not snapshot.exists()
    assert_one_line_error(run_cli("history", "show", "trip-plan"), 1,
                          "no conversation 'trip-plan' in the history")
    assert list(transcripts()) == ["hello"]
    assert run_cli("history", "rm", str(other_id)).exit_code == 0
    assert "no conversations yet" in run_cli("history").stderr


@pytest.mark.parametrize("command", [["show", "nope"], ["export", "nope"], ["rm", "nope"],
                                     ["show", "42"]])
def test_an_unknown_conversation_is_a_one_line_error(two_conversations, command):
    assert_one_line_error(run_cli("history", *command), 1, "no conversation",
                          "localchat history")


def test_history_without_a_database_creates_nothing():
    result = run_cli("history")
    assert result.exit_code == 0 and result.stdout == ""
    assert "no conversations yet" in result.stderr
    assert_one_line_error(run_cli("history", "show", "trip-plan"), 1, "no conversation")
    assert not paths.data_dir().exists()


def test_a_corrupt_or_newer_database_is_a_clear_error_and_left_untouched(two_conversations):
    with sqlite3.connect(db_file()) as raw:
        raw.execute("PRAGMA user_version = 99")
    raw.close()
    before = sha256(db_file())
    assert_one_line_error(run_cli("history"), 1, "schema version 99", "left untouched")
    assert sha256(db_file()) == before
    db_file().write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    before = sha256(db_file())
    for command in (["history"], ["history", "show", "1"], ["history", "rm", "1"]):
        assert_one_line_error(run_cli(*command), 1, "damaged", "left untouched")
    assert sha256(db_file()) == before


# SIGKILL during one-shot runs


def read_first_byte(process: subprocess.Popen, timeout: float = 60) -> bytes:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return os.read(process.stdout.fileno(), 1) if ready else b""


def kill_trial(model: Path, number: int, delay: float, after_first_token: bool) -> dict:
    """Run one prompt and SIGKILL it `delay` s after it starts, or after its first token."""
    prompt = f"Trial {number}: write a long list of colours."
    process = subprocess.Popen(
        [sys.executable, "-m", "localchat", "run", str(model), prompt, "--ignore-eos", *RUN,
         "--max-tokens", "16"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = read_first_byte(process) if after_first_token else b""
    time.sleep(delay)
    process.kill()
    rest, _ = process.communicate(timeout=60)
    return {"prompt": prompt, "code": process.returncode, "stdout": (first + rest).decode()}


@pytest.mark.slow
def test_sigkill_at_random_moments_never_damages_the_history_or_loses_a_turn(smollm2_path):
    rng = random.Random(5)
    # Half the kills land anywhere from start-up to the end, half while the reply streams;
    # two at a time, which also makes two writers share the database.
    plans = [(number, rng.uniform(0.2, 2.0) if number % 2 else rng.uniform(0.0, 0.4),
              number % 2 == 0) for number in range(KILL_TRIALS)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        trials = list(pool.map(lambda plan: kill_trial(smollm2_path, *plan), plans))
    raw = sqlite3.connect(db_file())
    assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    raw.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
    raw.close()
    stored = transcripts()
    for conversation in stored.values():  # nothing half-written: a turn is whole or absent
        assert [m["role"] for m in conversation] in ([], ["user"], ["user", "assistant"])
    finished = [trial for trial in trials if trial["code"] == 0]
    killed = [trial for trial in trials if trial["code"] == -signal.SIGKILL]
    assert len(finished) + len(killed) == KILL_TRIALS
    assert len(killed) >= KILL_TRIALS // 4, trials
    assert any(trial["stdout"] for trial in killed), "no kill landed while a reply streamed"
    for trial in finished:  # every completed turn is there, word for word
        user, assistant = stored[trial["prompt"]]
        assert assistant["content"].rstrip("\n") == trial["stdout"].rstrip("\n")
        assert assistant["interrupted"] is False
