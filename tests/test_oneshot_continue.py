"""One-shots that continue: -c/--continue and --session with a PROMPT or a pipe, their
snapshots, and the snapshot of a long fixed prefix that makes the next one-shot start warm."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli

from localchat.history import snapshots
from localchat.history.records import open_history

# ---- refused before anything runs ----------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["-c", "--no-history", "hi"],
     "--continue continues a saved conversation, and the history is off"),
    (["--session", "trip", "--no-history", "hi"],
     "--session continues a saved conversation, and the history is off"),
    (["--session", "trip", "-c", "hi"], "--session and --continue cannot be used together"),
    (["--session", "../etc/passwd", "hi"], "invalid conversation name '../etc/passwd'"),
    (["--session", "a/b", "hi"], "invalid conversation name 'a/b'"),
])
def test_bad_continuations_are_usage_errors_that_say_why(argv, message):
    result = run_cli("run", *argv)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and result.stdout == ""


def test_history_off_in_the_config_also_refuses_continue(tmp_path):
    from localchat import paths

    paths.config_file().parent.mkdir(parents=True, exist_ok=True)
    paths.config_file().write_text("history = false\n")
    result = run_cli("run", "-c", "hi")
    assert result.exit_code == 2 and "the history is off" in result.stderr


# ---- with the real model -------------------------------------------------------------------------

FLAGS = ("--temperature", "0", "-n", "6", "--ctx", "2048", "--threads", "1")


def run_json(*argv: str, stdin: str = "") -> dict:
    result = run_cli("run", *argv, *FLAGS, "--json", stdin=stdin)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def messages_of(label: str) -> list[tuple[str, str]]:
    with open_history() as store:
        record = store.find_conversation(label.removeprefix("#"))
        return [(m.role, m.content) for m in store.messages(record.id)]


@pytest.mark.slow
def test_continue_takes_the_last_conversation_its_model_and_its_snapshot(smollm2_path):
    first = run_json(str(smollm2_path), "My name is Ada.")
    assert first["snapshot_tokens"] == 0
    second = run_json("-c", "What is my name?")  # a lone argument is the PROMPT
    assert second["conversation"] == first["conversation"]
    assert second["model"] == first["model"] == str(smollm2_path)
    # only the new tokens are processed: the snapshot covers the first exchange
    assert second["snapshot_tokens"] > 0
    assert second["cached_prompt_tokens"] >= second["snapshot_tokens"] > first["prompt_tokens"] - 2
    assert [role for role, _ in messages_of(first["conversation"])] == [
        "user", "assistant", "user", "assistant"]
    third = run_json("--continue", stdin="And in French?\n")  # a pipe works too
    assert third["conversation"] == first["conversation"]
    assert messages_of(first["conversation"])[4] == ("user", "And in French?")
    assert third["cached_prompt_tokens"] > second["prompt_tokens"] - 2


@pytest.mark.slow
def test_continue_with_no_history_starts_a_new_conversation_and_says_so(smollm2_path):
    result = run_cli("run", str(smollm2_path), "-c", "Hello", *FLAGS)
    assert result.exit_code == 0
    assert "no conversation to continue: starting a new one" in result.stderr
    with open_history() as store:
        assert len(store.list_conversations()) == 1


@pytest.mark.slow
def test_a_named_session_is_created_then_continued_one_shot(smollm2_path):
    first = run_json(str(smollm2_path), "--session", "trip", "Plan a day in Tokyo.")
    other = run_json(str(smollm2_path), "Unrelated.")
    assert first["conversation"] == "trip" and other["conversation"] != "trip"
    again = run_json("--session", "trip", "Add a day in Kyoto")
    assert again["conversation"] == "trip" and again["snapshot_tokens"] > 0
    assert [content for _, content in messages_of("trip")][::2] == [
        "Plan a day in Tokyo.", "Add a day in Kyoto"]


@pytest.mark.slow
def test_a_long_fixed_prefix_is_snapshotted_and_the_next_one_shot_loads_it(smollm2_path):
    system = "You answer questions about the solar system. " * 40  # ~400 tokens
    first = run_json(str(smollm2_path), "--system", system, "Name a planet.")
    assert first["cached_prompt_tokens"] == 0
    with open_history() as store:
        rows = store._rows("SELECT token_count FROM prefix_snapshots")
    assert len(rows) == 1 and rows[0]["token_count"] >= 256
    second = run_json(str(smollm2_path), "--system", system, "Name a moon.")
    assert second["snapshot_tokens"] == rows[0]["token_count"]
    assert second["cached_prompt_tokens"] >= rows[0]["token_count"]
    assert second["prompt_tokens"] - second["cached_prompt_tokens"] < 20
    short = run_json(str(smollm2_path), "--system", "Be brief.", "Name a star.")
    assert short["snapshot_tokens"] == 0  # too short to be worth a snapshot


@pytest.mark.slow
def test_attached_files_that_come_first_are_part_of_the_fixed_prefix(smollm2_path, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("- the meeting is on Tuesday\n" * 60)
    first = run_json(str(smollm2_path), "-f", str(notes), "When is the meeting?")
    second = run_json(str(smollm2_path), "-f", str(notes), "What day again?")
    assert first["snapshot_tokens"] == 0 and second["snapshot_tokens"] >= 256


@pytest.mark.slow
def test_prefix_snapshots_share_the_cap_and_lru_eviction(smollm2_path, monkeypatch):
    system = "Facts about the ocean follow. " * 60
    run_json(str(smollm2_path), "--system", system, "One")
    with open_history() as store:
        sizes = store._rows("SELECT size_bytes FROM prefix_snapshots UNION ALL "
                            "SELECT size_bytes FROM snapshots")
    # a cap that holds one file only: the next run's files (as large) evict the older ones
    cap = max(row["size_bytes"] for row in sizes) + 1
    monkeypatch.setattr(snapshots, "DEFAULT_CAP_BYTES", cap)
    run_json(str(smollm2_path), "--system", system.replace("ocean", "river"), "Two")
    with open_history() as store:
        left = store._rows("SELECT path FROM prefix_snapshots UNION ALL "
                           "SELECT path FROM snapshots")
    assert len(left) == 1
    assert len(list(snapshots.snapshot_dir().glob("*.kvsnap"))) == 1
