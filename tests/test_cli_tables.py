"""`localchat history` and `list` as a person sees them at a terminal, and as scripts get them.

No model is loaded: the history is written directly, and the commands run in a pseudo-terminal
(pexpect, a real process) or in-process with pipes for streams (`run_cli`). Stored text came from
people and models, so control characters must not reach the terminal; tables fit the terminal;
pipes get the exact text.
"""

from __future__ import annotations

import json
import os
import sys

import pexpect
import pyte
import pytest
from cli_runner import CliResult, run_cli
from gguf_factory import write_tiny_gguf

from localchat import paths
from localchat.history.records import open_history

HOSTILE = "A\x1b[2J\x1b[31mRED"
LONG_PATH = "/home/someone/models/some-long-folder-name/" + "x" * 40 + "/SmolLM2-135M.Q4_1.gguf"
WIDTH = 80


def at_a_terminal(*args: str, columns: int = WIDTH, **env: str) -> str:
    """What `localchat ARGS` writes to a pseudo-terminal `columns` wide."""
    child = pexpect.spawn(sys.executable, ["-m", "localchat", *args],
                          env={**os.environ, "TERM": "xterm", **env}, dimensions=(24, columns),
                          encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    output = child.before
    child.close()
    assert child.exitstatus == 0, output
    return output


def seen(output: str, columns: int = WIDTH) -> list[str]:
    """The rows a VT100 `columns` wide shows for `output`."""
    display = pyte.Screen(columns, 60)
    display.set_mode(pyte.modes.LNM)
    pyte.Stream(display).feed(output)
    rows = [row.rstrip() for row in display.display]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def in_a_pipe(*args: str) -> CliResult:
    """`localchat ARGS` with stdout and stderr that are not a terminal, in-process."""
    return run_cli(*args)


@pytest.fixture
def hostile_history():
    """A one-shot run of `printf 'A\\x1b[2J\\x1b[31mRED' | localchat run ./model.gguf`."""
    with open_history() as store:
        record = store.create_conversation(LONG_PATH, system_prompt=f"Be {HOSTILE}.")
        store.add_message(record.id, "user", f"Say {HOSTILE} please, it is a sourdough test.")
        store.add_message(record.id, "assistant", f"Sure: {HOSTILE} " + "and more words " * 12)
    return record.id


def test_stored_control_characters_are_shown_escaped_at_a_terminal(hostile_history):
    for command in (["history"], ["history", "show", "1"], ["history", "search", "sourdough"]):
        output = at_a_terminal(*command)
        assert "\x1b[2J" not in output and "\x1b[31m" not in output, command
        assert "\\x1b[2J" in output or "\\x1b[2J" in "".join(seen(output)), command
    exported = in_a_pipe("history", "export", "1", "--format", "json")
    messages = json.loads(exported.stdout)["messages"]
    assert messages[0]["content"] == f"Say {HOSTILE} please, it is a sourdough test."
    assert HOSTILE in in_a_pipe("history", "export", "1").stdout  # Markdown: exact text too


def test_history_tables_fit_the_terminal_and_show_the_model_file_name(hostile_history):
    rows = seen(at_a_terminal("history"))
    assert rows[0].split()[:3] == ["ID", "NAME", "MODEL"]
    assert all(len(row) <= WIDTH for row in rows)
    assert "SmolLM2-135M.Q4_1.gguf" in rows[1] and "some-long-folder" not in rows[1]
    assert rows[1].split()[-3].endswith("…")  # the last message, cut to fit
    piped = in_a_pipe("history").stdout.splitlines()
    assert "SmolLM2-135M.Q4_1.gguf" in piped[1] and "some-long-folder" not in piped[1]
    assert f"Sure: {HOSTILE} and more words" in piped[1]  # a pipe gets the text as it is
    assert len(piped[1]) > WIDTH


def test_search_matches_are_bold_at_a_terminal_and_unmarked_in_a_pipe(hostile_history):
    output = at_a_terminal("history", "search", "sourdough")
    assert "**" not in output
    display = pyte.Screen(WIDTH, 24)
    display.set_mode(pyte.modes.LNM)
    pyte.Stream(display).feed(output)
    row = next(y for y in range(24) if "sourdough" in "".join(
        display.buffer[y][x].data for x in range(WIDTH)))
    text = "".join(display.buffer[row][x].data for x in range(WIDTH))
    start = text.index("sourdough")
    assert all(display.buffer[row][x].bold for x in range(start, start + len("sourdough")))
    assert not display.buffer[row][start - 2].bold
    plain = in_a_pipe("history", "search", "sourdough").stdout
    assert "sourdough" in plain and "**" not in plain and "\x1b[1m" not in plain
    no_color = at_a_terminal("history", "search", "sourdough", NO_COLOR="1")
    assert "**" not in no_color and "\x1b[1m" not in no_color


def test_history_says_when_the_history_is_off(hostile_history):
    paths.config_dir().mkdir(parents=True)
    paths.config_file().write_text("history = false\n")
    result = in_a_pipe("history")
    assert result.exit_code == 0
    assert result.stderr.startswith("the history is off (history = false in ")
    assert "SmolLM2-135M.Q4_1.gguf" in result.stdout  # what was saved before is still listed
    (paths.data_dir() / "history.db").unlink()
    empty = in_a_pipe("history")
    assert empty.stderr.startswith("the history is off") and "no conversations yet" not in \
        empty.stderr


def test_list_counts_the_parameters_of_any_gguf_and_fits_its_paths(tmp_path):
    snapshot = paths.hf_hub_cache() / "models--someone--tiny-GGUF" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    write_tiny_gguf(snapshot / "tiny-model.Q4_1.gguf")
    [model] = json.loads(in_a_pipe("list", "--json").stdout)["models"]
    assert model["parameter_count"] > 0 and model["parameters"] not in (None, "-")
    header, row = in_a_pipe("list").stdout.splitlines()
    assert row.split()[4] == model["parameters"]  # NAME QUANT SIZE(2 words) PARAMS
    rows = seen(at_a_terminal("list", columns=60), columns=60)
    assert all(len(line) <= 60 for line in rows) and "…" in rows[1]
