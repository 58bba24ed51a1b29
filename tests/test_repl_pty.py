"""`localchat run` with no prompt, end to end in a real pseudo-terminal: what a person sees.

The terminal is pexpect's pty. prompt-toolkit asks the terminal where the cursor is (CPR,
ESC[6n) before it draws the toolbar; `Terminal.wait` answers like a real terminal would.
"""

from __future__ import annotations

import io
import os
import re
import sys

import pexpect
import pyte
import pytest
from cli_runner import run_cli
from rich.console import Console
from rich.markdown import Markdown

from localchat.history import snapshots
from localchat.history.records import open_history

pytestmark = pytest.mark.slow

CURSOR_QUERY = re.escape("\x1b[6n")
QUESTION = "What is the capital of France?"
# Greedy, short, one thread (faster than two spinning threads on a busy CPU), a small window.
CHAT = ["--temperature", "0", "--max-tokens", "40", "--threads", "1", "--ctx", "1024"]
AFTER_A_REPLY = r"\d+ / 1024 tokens · [\d.,]+ tok/s"  # the toolbar, once a reply has a speed


class Terminal:
    """`localchat run MODEL ARGS` in a pty, with everything it printed kept in `screen`."""

    def __init__(self, model, *args: str, env: dict[str, str] | None = None,
                 columns: int = 100) -> None:
        self.screen = io.StringIO()
        self.columns = columns
        self.child = pexpect.spawn(
            sys.executable, ["-m", "localchat", "run", str(model), *args],
            env={**os.environ, "TERM": "xterm", **(env or {})}, dimensions=(24, columns),
            encoding="utf-8", timeout=90,
        )
        self.child.logfile_read = self.screen

    def wait(self, pattern: str) -> str:
        """Read until `pattern` (a regex) shows up; answer cursor-position queries meanwhile."""
        while self.child.expect([CURSOR_QUERY, pattern]) == 0:
            self.child.send("\x1b[1;1R")
        return self.child.match.group(0)

    def type(self, keys: str) -> None:
        self.child.send(keys)

    def leave(self, keys: str = "\x04") -> int:
        """Press Ctrl-D (or type `keys`), wait for the end, and return the exit status."""
        self.child.send(keys)
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def saved_messages() -> list[tuple[str, str, bool]]:
    with open_history() as store:
        [summary] = store.list_conversations()
        return [(m.role, m.content, m.interrupted) for m in store.messages(summary.id)]


def test_a_chat_streams_replies_takes_commands_and_leaves_on_ctrl_d(smollm2_path):
    terminal = Terminal(smollm2_path, *CHAT, "--no-markdown")
    terminal.wait("Ctrl-D to leave")
    terminal.wait(">>>")
    terminal.type(f"{QUESTION}\r")
    terminal.wait(AFTER_A_REPLY)
    terminal.type("/stats\r")
    terminal.wait("reused from the cache")
    terminal.type("/set temperature abc\r")
    terminal.wait(re.escape("/set temperature must be a number, 0 or more (got 'abc')"))
    terminal.type("/nosuch\r")
    terminal.wait("unknown command /nosuch")
    terminal.type("/cont")
    terminal.wait("/cont")
    terminal.type("\t")  # Tab completes the command; the terminal redraws only what changed
    terminal.wait("ext")
    terminal.type("\r")
    terminal.wait(r"\d+ / 1024 tokens used")
    terminal.type("half a thought")
    terminal.wait("half a thought")
    terminal.type("\x03")  # Ctrl-C at the prompt: the line is gone, nothing is sent
    terminal.type("/context\r")
    terminal.wait(r"\d+ / 1024 tokens used")
    assert terminal.leave() == 0
    [question, reply] = saved_messages()
    assert question == ("user", QUESTION, False)
    assert reply[0] == "assistant" and reply[1] and not reply[2]
    assert reply[1] in terminal.screen.getvalue().replace("\r\n", "\n")
    assert "Traceback" not in terminal.screen.getvalue()


def test_ctrl_c_mid_answer_keeps_the_partial_reply_and_the_chat_goes_on(smollm2_path):
    terminal = Terminal(smollm2_path, "--temperature", "0", "--threads", "1", "--ctx", "1024",
                        "--ignore-eos", "--max-tokens", "2000", "--no-markdown")
    terminal.wait(">>>")
    terminal.type("Tell me a long story.\r")
    terminal.wait(re.escape("\x1b[?2004l"))  # the prompt is done; the reply comes next
    terminal.wait(r"\w+ \w+ \w+")  # a few words have streamed in
    terminal.type("\x03")
    terminal.wait("interrupted: the partial reply is kept")
    terminal.type("/stats\r")
    terminal.wait("finish interrupted")
    assert terminal.leave("/bye\r") == 0
    [_, (role, partial, interrupted)] = saved_messages()
    assert role == "assistant" and interrupted and partial
    assert len(partial) < 2000  # far from the 2,000 tokens it was asked for


def test_markdown_session_resume_and_model_switch(smollm2_path):
    first = Terminal(smollm2_path, *CHAT, "--session", "trip")
    first.wait(">>>")
    first.type(f"{QUESTION}\r")
    first.wait(AFTER_A_REPLY)
    first.type("/model nosuchmodel\r")
    first.wait(r"unknown model 'nosuchmodel'.*still using")
    first.type(f"/model {smollm2_path}\r")
    first.wait("now using")
    assert first.leave() == 0

    second = Terminal(smollm2_path, *CHAT, "--session", "trip", "--verbose")
    second.wait(re.escape("continuing conversation trip (1 turn(s))"))
    second.wait("resumed from a snapshot")
    second.wait(">>>")
    second.type("/context\r")
    second.wait(r"\d+ / 1024 tokens used")
    assert second.leave("/exit\r") == 0
    assert len(saved_messages()) == 2


def test_piped_stdin_is_a_one_shot_prompt_not_a_chat(smollm2_path):
    result = run_cli("run", str(smollm2_path), *CHAT, stdin="Say hello.")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert ">>>" not in result.stdout and "Ctrl-D" not in result.stderr


def test_model_for_a_missing_file_offline_or_declined_keeps_the_chat(smollm2_path):
    """HF_HUB_OFFLINE counts like --offline: no question; declining the download is one line."""
    offline = Terminal(smollm2_path, *CHAT, env={"HF_HUB_OFFLINE": "1"})
    offline.wait(">>>")
    offline.type("/model smollm2\r")
    said = offline.wait(r"Download it now\?|still using[^\n]*")
    assert said.startswith("still using"), "asked to download while offline"
    assert "offline mode is on" in offline.screen.getvalue()
    offline.wait(">>>")
    offline.type("/context\r")
    offline.wait(r"\d+ / 1024 tokens used")
    assert offline.leave("/bye\r") == 0

    online = Terminal(smollm2_path, *CHAT, env={"HF_HUB_OFFLINE": ""})
    online.wait(">>>")
    online.type("/model smollm2\r")
    online.wait(re.escape("Download it now? [Y/n]"))
    online.type("n\r")
    online.wait(r"smollm2:q4_1 is not on disk and was not downloaded \(still using")
    online.wait(">>>")
    online.type("/show\r")
    online.wait(re.escape(str(smollm2_path)))
    assert online.leave("/bye\r") == 0
    for terminal in (offline, online):
        assert "Traceback" not in terminal.screen.getvalue()


def test_deleting_the_open_conversation_elsewhere_is_one_note_and_a_clean_exit(smollm2_path):
    chat = Terminal(smollm2_path, *CHAT, "--session", "live")
    chat.wait(">>>")
    chat.type(f"{QUESTION}\r")
    chat.wait(AFTER_A_REPLY)
    removed = run_cli("history", "rm", "live")  # from elsewhere: here, in-process
    assert removed.exit_code == 0, removed.stderr
    chat.type("And of Italy?\r")
    chat.wait(r"conversation live was deleted from the history; this chat goes on as "
              r"conversation #\d+")
    chat.wait(AFTER_A_REPLY)
    assert chat.leave("/bye\r") == 0
    screen = chat.screen.getvalue()
    assert screen.count("was deleted from the history") == 1
    assert "not saved" not in screen and "Traceback" not in screen
    assert [(role, text) for role, text, _ in saved_messages()][0] == ("user", "And of Italy?")
    with open_history() as store:
        owned = {path.resolve() for path in store.snapshot_paths()}
    files = set(snapshots.snapshot_dir().glob("*"))
    assert {path.resolve() for path in files} <= owned, "a snapshot file no conversation owns"
    assert owned  # the new conversation's snapshot


def test_stored_control_characters_are_shown_escaped_in_the_chat(smollm2_path):
    hostile = "A\x1b[2J\x1b[31mRED"
    with open_history() as store:
        record = store.create_conversation(f"/somewhere/else/{smollm2_path.name}",
                                           name="hostile")
        store.add_message(record.id, "user", f"Say {hostile}")
        store.add_message(record.id, "assistant", f"Sure: {hostile}")
    chat = Terminal(smollm2_path, *CHAT, "--session", "hostile")
    chat.wait(re.escape("continuing conversation hostile"))
    chat.wait(">>>")
    chat.type("/history\r")
    chat.wait(r"LAST MESSAGE")
    chat.wait(">>>")
    assert chat.leave("/bye\r") == 0
    screen = chat.screen.getvalue()
    assert "\x1b[2J" not in screen and "\x1b[31m" not in screen
    assert ">>> Say A\\x1b[2J\\x1b[31mRED" in screen  # the last exchange, shown on resume
    assert "Sure: A\\x1b[2J\\x1b[31mRED" in screen  # in /history too, where it is the last
    table = screen.split("LAST MESSAGE", 1)[1]
    assert smollm2_path.name in table and "/somewhere/else" not in table  # a path: its file


def screen_rows(output: str, columns: int, rows: int = 24) -> list[str]:
    """Everything a terminal `columns` wide shows for `output`, scrollback included."""
    display = pyte.HistoryScreen(columns, rows, history=10_000, ratio=0.5)
    display.set_mode(pyte.modes.LNM)
    pyte.Stream(display).feed(output)
    lines = [*display.history.top, *(display.buffer[y] for y in range(rows))]
    return ["".join(line[x].data for x in range(columns)).rstrip() for line in lines]


@pytest.mark.parametrize("columns", [100, 140])
def test_ctrl_c_mid_markdown_reply_shows_each_row_once(smollm2_path, columns):
    """The terminal echoes ^C at the end of the live rows; the last redraw must not repeat
    the live paragraph's first row."""
    chat = Terminal(smollm2_path, "--temperature", "0", "--threads", "1", "--ctx", "1024",
                    "--ignore-eos", "--max-tokens", "2000", columns=columns)
    chat.wait(">>>")
    chat.type("Tell me a long story.\r")
    chat.wait(re.escape("\x1b[?2004l"))  # the prompt is done; the reply comes next
    chat.wait(r"(\w+\W+){12}")  # a row or so has streamed in
    chat.type("\x03")
    chat.wait("interrupted: the partial reply is kept")
    chat.wait(">>>")
    assert chat.leave("/bye\r") == 0
    [_, (_, partial, interrupted)] = saved_messages()
    assert interrupted and partial
    rows = screen_rows(chat.screen.getvalue(), columns)
    start = next(i for i, row in enumerate(rows) if row.startswith(">>> Tell me a long story."))
    end = next(i for i, row in enumerate(rows) if row.startswith("interrupted: the partial"))
    console = Console(file=io.StringIO(), width=columns, force_terminal=True, _environ={})
    console.print(Markdown(partial))
    expected = screen_rows(console.file.getvalue(), columns, rows=200)
    while expected and not expected[-1]:
        expected.pop()
    assert rows[start + 1 : end] == expected
