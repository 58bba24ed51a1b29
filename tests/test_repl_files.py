"""The chat's /file, /schema and /preset, and Tab completion of their arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_harness import GREEDY, chat, error_lines

from localchat.chat.session import ChatSession, ReplOptions
from localchat.chat.slash_commands import completions
from localchat.config import load_config
from localchat.history.records import open_history
from localchat.oneshot import Request
from localchat.render import Environment

pytestmark = pytest.mark.slow


def last_user_message() -> str:
    with open_history() as store:
        messages = store.messages(store.last_conversation().id)
    return [m.content for m in messages if m.role == "user"][-1]


def test_file_attaches_to_the_next_message_and_shows_its_tokens(fresh_smollm2, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("The meeting is on Tuesday.\n")
    result = chat(fresh_smollm2, f"/file {notes}\rWhen is the meeting?\r")
    assert f"attached {notes} (" in result.stderr and " tokens); with your next message" in (
        result.stderr)
    tokens = int(result.stderr.split(f"attached {notes} (")[1].split(" tokens")[0])
    assert 10 < tokens < 80  # the fence and the long temporary path count too
    assert last_user_message() == (f"File {notes}:\n```\nThe meeting is on Tuesday.\n```\n\n"
                                   "When is the meeting?")


def test_file_refusals_are_one_line_and_the_chat_goes_on(fresh_smollm2, tmp_path):
    png = tmp_path / "logo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    big = tmp_path / "big.txt"
    big.write_text("word " * 2000)  # fits no 1024-token window
    result = chat(fresh_smollm2, f"/file {tmp_path / 'gone'}\r/file {png}\r/file {tmp_path}\r"
                         f"/file {big}\r/file\rHello\r")
    errors = error_lines(result.stderr)
    assert "no such file" in errors[0] and "a PNG image" in errors[1]
    assert "is a directory" in errors[2]
    assert f"{big} is " in errors[3] and "the room left is" in errors[3]
    assert "usage: /file PATH" in errors[4]
    assert last_user_message() == "Hello"


def test_schema_makes_replies_json_until_off(fresh_smollm2, tmp_path):
    result = chat(fresh_smollm2, "/schema name, age int\rInvent a person.\r/schema\r/schema off\r"
                         "/schema {\"type\": \"integer\", \"minimum\": 1}\rHi\r",
                  sampling=GREEDY.__class__(temperature=0.0, max_tokens=60))
    reply = result.stdout.split(">>>")[0] if ">>>" in result.stdout else result.stdout
    value = json.loads(reply.strip().splitlines()[0])
    assert set(value) == {"name", "age"}
    assert "replies are JSON following name, age int until /schema off" in result.stderr
    assert "schema: name, age int" in result.stderr
    assert "replies are free text again" in result.stderr
    assert "the keyword 'minimum' (1) cannot be enforced" in error_lines(result.stderr)[0]


def test_preset_sets_system_sampling_schema_and_files(fresh_smollm2, tmp_path):
    from localchat import paths

    (paths.config_file().parent).mkdir(parents=True, exist_ok=True)
    (paths.config_file().parent / "glossary.md").write_text("ADA: a person's name\n")
    paths.config_file().write_text('[presets.person]\nsystem = "You invent people."\n'
                                   'temperature = 0.0\nmax_tokens = 60\n'
                                   'schema = "name, age int"\nfiles = ["glossary.md"]\n')
    presets = load_config().presets
    result = chat(fresh_smollm2, "/preset persn\r/preset person\rInvent one.\r/show\r",
                  options=ReplOptions(markdown=False, presets=presets))
    assert "no preset 'persn' in config.toml (did you mean person?" in error_lines(
        result.stderr)[0]
    assert "preset person: temperature=0.0 max_tokens=60 schema files=glossary.md" in (
        result.stderr)
    assert last_user_message().startswith("File glossary.md:\n```\nADA: a person's name\n```")
    assert "You invent people." in result.stdout  # /show lists the system prompt


def test_tab_completes_paths_presets_and_schema_words(fresh_smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("app.py").write_text("x")
    Path("apps").mkdir()
    Path(".hidden").write_text("x")
    env = Environment()
    request = Request(model="m", prompt=None, system=None, sampling=GREEDY, engine=None)
    session = ChatSession(request, env, ReplOptions(presets={"commit": None, "person": None}),
                          None, fresh_smollm2, owns_engine=False)
    assert completions(session, "/file ap") == ["app.py", "apps/"]
    assert completions(session, "/file ") == ["app.py", "apps/"]  # hidden files need a dot
    assert completions(session, f"/file {tmp_path}/app") == [f"{tmp_path}/app.py",
                                                              f"{tmp_path}/apps/"]
    assert completions(session, "/preset c") == ["commit"]
    assert completions(session, "/schema o") == ["off"]
    assert "/file" in completions(session, "/fi")
