"""The REPL's logic, driven through prompt-toolkit's pipe input with the real model.

Each test types keys into a pipe (Enter is \\r, Ctrl-C \\x03, Esc-Enter \\x1b\\r), lets the REPL
run until the pipe is closed (Ctrl-D), and asserts the transcript and the history rows.
Ctrl-C while a reply streams is a real SIGINT, raised when the reply reaches stdout.
"""

from __future__ import annotations

import io
import os
import re
import signal
import stat
from dataclasses import replace

import pytest
from chat_harness import GREEDY, TerminalText, chat, error_lines
from cli_runner import run_cli

from localchat import paths
from localchat.chat.repl import (
    block_is_open,
    clean_text,
    message_text,
)
from localchat.chat.session import ChatSession, ReplOptions
from localchat.chat.slash_commands import completions
from localchat.commands.models import ensure_local
from localchat.engine.loader import load_engine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.errors import UsageError
from localchat.history.records import default_history_path, open_history
from localchat.models.catalog import resolve_model
from localchat.oneshot import Request
from localchat.render import Environment

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


class CtrlCAfter(io.StringIO):
    """stdout that presses Ctrl-C (a real SIGINT to this process) once `after` characters came."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.after and self.tell() >= self.after:
            self.after = 0
            signal.raise_signal(signal.SIGINT)
        return written


def stored() -> list[list[tuple[str, str, bool]]]:
    """Every conversation in the history, oldest first, as (role, content, interrupted)."""
    if not default_history_path().exists():
        return []
    with open_history() as store:
        ids = sorted(s.id for s in store.list_conversations(100))
        return [[(m.role, m.content, m.interrupted) for m in store.messages(i)] for i in ids]


def direct_reply(engine, messages: list[dict[str, str]], sampling: Sampling = GREEDY) -> str:
    return "".join(engine.stream(messages, sampling))


# --- turns ---------------------------------------------------------------------------------


def test_a_turn_prints_the_reply_and_saves_both_messages(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r")
    expected = direct_reply(fresh_smollm2, [{"role": "user", "content": QUESTION}])
    assert result.status == 0
    assert expected and result.stdout == expected + "\n\n"
    assert "Traceback" not in result.stderr and not error_lines(result.stderr)
    assert stored() == [[("user", QUESTION, False), ("assistant", expected, False)]]
    with open_history() as store:
        reply = store.messages(1)[1]
    assert reply.token_count == reply.timings["completion_tokens"] > 0


def test_the_next_turn_processes_only_the_new_tokens(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r/stats\rAnd of Italy?\r/stats\r")
    stats = fresh_smollm2.last_stats
    first_prompt = int(result.stdout.split("prompt    ")[1].split(" tokens")[0])
    assert "0 reused from the cache" in result.stdout  # the first turn: a cold cache
    # Everything up to the first reply is reused; only the reply's end and the question are new.
    assert stats.cached_tokens > first_prompt
    assert stats.prefill_tokens < 20
    assert f"{stats.cached_tokens} reused from the cache, {stats.prefill_tokens} processed" \
        in result.stdout


def test_retry_regenerates_the_reply_from_the_cache_and_replaces_it(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r/retry\r")
    stats = fresh_smollm2.last_stats
    reply = direct_reply(fresh_smollm2, [{"role": "user", "content": QUESTION}])
    assert result.stdout == f"{reply}\n\n{reply}\n\n"  # greedy: the same text again
    assert stats.cached_tokens == stats.prompt_tokens - 1  # only the last token is re-read
    assert stored() == [[("user", QUESTION, False), ("assistant", reply, False)]]


def test_undo_drops_the_last_exchange_and_the_next_turn_reuses_the_cache(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r/context\rAnd of Italy?\r/undo\r/context\r"
                         "And of Spain?\r/undo\r/undo\r/undo\r")
    counts = [line for line in result.stdout.splitlines() if line.endswith("tokens used")]
    assert counts[0] == counts[1]  # back where it was before the second question
    # "Spain" after /undo: the first turn is reused
    assert fresh_smollm2.last_stats.cached_tokens > 30
    assert result.stderr.count("removed the last exchange") == 3
    assert error_lines(result.stderr) == ["error: nothing to undo (the conversation is empty)"]
    assert stored() == [[]]


def test_clear_starts_a_new_conversation_with_the_same_system_prompt(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r/clear\rHello!\r", system="You are terse.")
    assert "new conversation" in result.stderr
    conversations = stored()
    assert [len(messages) for messages in conversations] == [2, 2]
    with open_history() as store:
        assert [store.find_conversation(i).system_prompt for i in (1, 2)] == \
            ["You are terse.", "You are terse."]


def test_set_changes_sampling_and_the_system_prompt_and_show_lists_them(fresh_smollm2):
    result = chat(fresh_smollm2, "/set temperature 0.2\r/set top_k 5\r/set max_tokens 4\r"
                         "/set system You are terse.\r/show\rHi\r/system\r")
    shown = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip()
             for line in result.stdout.splitlines() if "  " in line}
    assert (shown["temperature"], shown["top_k"]) == ("0.2", "5")
    assert shown["system prompt"] == "You are terse."
    assert "system prompt: You are terse." in result.stderr
    assert fresh_smollm2.last_stats.completion_tokens <= 4
    with open_history() as store:
        record = store.find_conversation(1)
    assert record.system_prompt == "You are terse."
    assert record.settings["temperature"] == 0.2 and record.settings["max_tokens"] == 4


def test_help_lists_every_command(fresh_smollm2):
    result = chat(fresh_smollm2, "/help\r")
    for command in ("/set PARAM VALUE", "/show", "/clear", "/undo", "/retry", "/context",
                    "/stats", "/model NAME", "/system TEXT", "/save NAME", "/load NAME",
                    "/history", "/bye", '"""'):
        assert command in result.stdout


def test_bye_and_exit_leave_with_status_zero(fresh_smollm2):
    for command in ("/bye", "/exit"):
        result = chat(fresh_smollm2, f"{command}\r/context\r")
        assert result.status == 0
        assert "tokens used" not in result.stdout  # nothing after /bye was read


# --- input: blocks, pastes, bad bytes, bad commands ----------------------------------------


def test_triple_quote_blocks_and_esc_enter_make_multi_line_messages(fresh_smollm2):
    chat(fresh_smollm2, '"""\rfirst line\r  second, indented\r"""\rone\x1b\rtwo\r')
    users = [content for role, content, _ in stored()[0] if role == "user"]
    assert users == ["first line\n  second, indented", "one\ntwo"]


def test_a_bracketed_paste_keeps_its_newlines_in_one_message(fresh_smollm2):
    chat(fresh_smollm2, "\x1b[200~line one\nline two\x1b[201~\r")
    assert stored()[0][0] == ("user", "line one\nline two", False)


def test_empty_and_whitespace_only_lines_send_nothing(fresh_smollm2):
    result = chat(fresh_smollm2, "\r   \r\t\r/context\r")
    assert result.stdout.endswith("tokens used\n")
    assert not error_lines(result.stderr)
    assert stored() == []


def test_a_100_kb_paste_is_refused_with_the_numbers_and_the_chat_goes_on(fresh_smollm2):
    paste = "All work and no play makes Jack a dull boy. " * 2300  # about 100 KB
    result = chat(fresh_smollm2, f"\x1b[200~{paste}\x1b[201~\r/context\r")
    [error] = error_lines(result.stderr)
    assert "tokens; the context window is 1024" in error
    assert int(error.split("prompt is ")[1].split(" ")[0]) > 20_000
    assert result.stdout.endswith("tokens used\n")
    assert stored() == []


def test_invalid_utf8_bytes_become_replacement_characters(fresh_smollm2):
    result = chat(fresh_smollm2, b"caf\xff\xfe ol\xc3\r")
    assert result.status == 0 and not error_lines(result.stderr)
    assert stored()[0][0] == ("user", "caf\ufffd\ufffd ol\ufffd", False)


def test_unknown_commands_and_bad_values_are_one_line_each(fresh_smollm2):
    result = chat(fresh_smollm2, "/nosuch\r/set temperature abc\r/set\r/set warmth 1\r/usr/bin?\r"
                         "/load\r/context\r")
    errors = error_lines(result.stderr)
    assert len(errors) == 6
    assert errors[0].startswith("error: unknown command /nosuch")
    assert "/set temperature must be a number, 0 or more (got 'abc')" in errors[1]
    assert "unknown setting 'warmth'" in errors[3]
    assert 'wrap it in """' in errors[4]
    assert result.stdout.endswith("tokens used\n")
    assert stored() == []


# --- Ctrl-C at every stage -----------------------------------------------------------------


def test_ctrl_c_at_the_prompt_clears_the_line(fresh_smollm2):
    result = chat(fresh_smollm2, "half a thought\x03/context\r")
    assert result.status == 0
    assert result.stdout.endswith("tokens used\n")
    assert stored() == []


def test_ctrl_c_while_streaming_keeps_the_partial_reply_marked_interrupted(fresh_smollm2):
    long = Sampling(temperature=0.0, max_tokens=400, ignore_eos=True)
    result = chat(fresh_smollm2, "Tell me a long story.\r/stats\r/set max_tokens 4\rThanks.\r",
                  sampling=long,
                  stdout=CtrlCAfter(after=30))
    assert result.status == 0
    assert "interrupted: the partial reply is kept" in result.stderr
    assert "finish interrupted" in result.stdout
    [[question, partial, thanks, _]] = stored()
    assert partial[0] == "assistant" and partial[2] is True
    assert 0 < len(partial[1]) < 400 and result.stdout.startswith(partial[1])
    assert thanks == ("user", "Thanks.", False)  # the chat went on after the interruption


def test_ctrl_c_before_the_first_token_drops_the_message(fresh_smollm2):
    class CtrlCWhenStreamStarts:
        """The real engine; Ctrl-C is pressed as the reply's prompt starts processing."""

        def __getattr__(self, name):
            return getattr(fresh_smollm2, name)

        def stream_parts(self, messages, sampling):
            signal.raise_signal(signal.SIGINT)
            yield from fresh_smollm2.stream_parts(messages, sampling)

    result = chat(CtrlCWhenStreamStarts(), f"{QUESTION}\r/context\r")
    assert "interrupted before the reply began" in result.stderr
    assert result.stdout.endswith("tokens used\n")
    assert stored() == [[]]


def test_ctrl_c_while_a_model_loads_keeps_the_current_model(fresh_smollm2, smollm2_path):
    def interrupted_loader(name):
        signal.raise_signal(signal.SIGINT)
        return cli_loader(name)

    result = chat(fresh_smollm2, f"/model {smollm2_path}\r{QUESTION}\r",
                  options=ReplOptions(markdown=False, load_model=interrupted_loader))
    assert "loading interrupted: still using smollm2" in result.stderr
    assert stored()[0][1][0] == "assistant"  # the next turn ran on the model still loaded


# --- models --------------------------------------------------------------------------------


def cli_loader(name: str):
    """What `localchat run` gives the REPL for /model: resolve, find on disk, load."""
    ref = resolve_model(name)
    path = ensure_local(ref, env=Environment(), offline=True)
    return ref.name, load_engine(EngineOptions(model_path=path, n_ctx=512, threads=1))


def test_an_unknown_model_is_one_line_and_the_current_model_stays(fresh_smollm2):
    result = chat(fresh_smollm2, f"/model nosuchmodel\r{QUESTION}\r",
                  options=ReplOptions(markdown=False, load_model=cli_loader))
    [error] = error_lines(result.stderr)
    assert "unknown model 'nosuchmodel'" in error and "still using smollm2" in error
    assert len(stored()[0]) == 2


def test_model_switches_and_keeps_the_conversation(fresh_smollm2, smollm2_path):
    result = chat(fresh_smollm2, f"{QUESTION}\r/model {smollm2_path}\r/show\rAnd of Italy?\r",
                  options=ReplOptions(markdown=False, load_model=cli_loader))
    assert f"now using {smollm2_path} (context 512 tokens)" in result.stderr
    assert re.search(r"^context +512 tokens$", result.stdout, re.MULTILINE)
    [messages] = stored()
    assert [role for role, _, _ in messages] == ["user", "assistant", "user", "assistant"]


# --- the context window --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(smollm2_path):
    loaded = load_engine(EngineOptions(model_path=smollm2_path, n_ctx=256, threads=1))
    yield loaded
    loaded.close()


def test_old_exchanges_are_dropped_with_a_note_and_kept_in_the_history(small):
    question = "Tell me about the history of the city of Paris, its rivers and its bridges. " * 3
    result = chat(small, f"{question}\r" * 5, sampling=replace(GREEDY, max_tokens=4))
    notes = [line for line in result.stderr.splitlines() if line.startswith("dropped")]
    assert notes and all("context window" in note for note in notes)
    assert len(notes) < 3  # trims go to half the window, so they are rare
    assert not error_lines(result.stderr)
    assert len(stored()[0]) == 10  # the history keeps every message



def test_a_reply_that_fills_the_window_says_so_and_usage_never_passes_the_window(small):
    small.reset_cache()
    result = chat(small, "Tell me a long story.\r/context\r",
                  sampling=Sampling(temperature=0.0, ignore_eos=True))
    assert small.last_stats.finish_reason == "context"
    assert "stopped at the end of the 256-token context window" in result.stderr
    used, window = (int(n) for n in result.stdout.rsplit(" tokens used", 1)[0].split()[-3::2])
    assert window == 256 and used <= window

# --- conversations that last ---------------------------------------------------------------


def test_a_named_session_is_created_then_resumed_from_its_snapshot(fresh_smollm2):
    first = chat(fresh_smollm2, f"{QUESTION}\r",
                 options=ReplOptions(markdown=False, session="trip"))
    fresh_smollm2.reset_cache()  # only the snapshot can spare the re-reading now
    second = chat(fresh_smollm2, "/stats\rAnd of Italy?\r", verbose=True,
                  options=ReplOptions(markdown=False, session="trip"))
    assert "continuing conversation trip (1 turn(s))" in second.stderr
    assert "resumed from a snapshot" in second.stderr
    assert second.stdout.startswith(f">>> {QUESTION}\n{first.stdout.strip()}\n")
    assert fresh_smollm2.last_stats.cached_tokens > 40  # the first exchange was not processed again
    [messages] = stored()
    assert len(messages) == 4


def test_continue_resumes_the_last_conversation(fresh_smollm2):
    chat(fresh_smollm2, "Hello!\r")
    chat(fresh_smollm2, f"{QUESTION}\r")
    result = chat(fresh_smollm2, "And of Italy?\r",
                  options=ReplOptions(markdown=False, resume_last=True))
    assert "continuing conversation #2" in result.stderr
    assert [len(messages) for messages in stored()] == [2, 4]


def test_continue_with_an_empty_history_starts_a_new_conversation(fresh_smollm2):
    result = chat(fresh_smollm2, "Hello!\r", options=ReplOptions(markdown=False, resume_last=True))
    assert "no conversation to continue: starting a new one" in result.stderr
    assert len(stored()) == 1


def test_save_load_and_history_commands(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r/save trip\r/clear\rHello!\r/save trip\r/history\r"
                         "/load trip\r/load nosuch\rAnd of Italy?\r")
    assert "saved as trip" in result.stderr
    errors = error_lines(result.stderr)
    assert "a conversation named 'trip' exists already" in errors[0]
    assert "no conversation 'nosuch'" in errors[1]
    table = result.stdout.split("ID  NAME")[1]
    assert "trip" in table and "*" in table  # the current one is marked
    assert "continuing conversation trip (1 turn(s))" in result.stderr
    with open_history() as store:
        trip = store.find_conversation("trip")
        assert [m.content for m in store.messages(trip.id)][2] == "And of Italy?"


def test_session_names_with_path_characters_and_no_history_are_refused(fresh_smollm2):
    with pytest.raises(UsageError, match="invalid conversation name"):
        chat(fresh_smollm2, "", options=ReplOptions(session="../etc"))
    with pytest.raises(UsageError, match="need the history"):
        chat(fresh_smollm2, "", history=False, options=ReplOptions(session="trip"))


def test_no_history_writes_nothing_to_disk(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r/history\r", history=False)
    assert "the history is off" in error_lines(result.stderr)[0]
    assert not paths.data_dir().exists() or not any(paths.data_dir().iterdir())
    assert not (paths.cache_dir() / "snapshots").exists()


def test_typed_lines_are_kept_in_a_private_input_history(fresh_smollm2):
    chat(fresh_smollm2, "/context\r")
    path = paths.data_dir() / "input_history"
    assert "/context" in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# --- rendering and completion --------------------------------------------------------------


def test_markdown_renders_on_a_terminal_and_can_be_turned_off(fresh_smollm2):
    result = chat(fresh_smollm2, f"{QUESTION}\r/set markdown off\r{QUESTION}\r",
                  options=ReplOptions(markdown=True), stdout=TerminalText())
    styled, plain = result.stdout.split("\n\n", 1)[0], result.stdout.rsplit("\n\n", 2)[-2]
    assert "\x1b[" in styled  # drawn by rich
    assert "\x1b[" not in plain and plain.strip()


def test_tab_completes_commands_settings_models_and_conversation_names(fresh_smollm2):
    chat(fresh_smollm2, f"{QUESTION}\r/save trip\r")
    with open_history() as store:
        session = ChatSession(Request("smollm2", None, None, GREEDY, None), Environment(),
                              ReplOptions(), store, fresh_smollm2, owns_engine=False)
        assert completions(session, "/se") == ["/set"]
        assert completions(session, "/set te") == ["temperature"]
        assert completions(session, "/set markdown o") == ["on", "off"]
        assert "smollm2" in completions(session, "/model smol")
        assert completions(session, "/load t") == ["trip"]
        assert completions(session, "hello /se") == []


def test_input_helpers():
    assert block_is_open('"""') and block_is_open('"""\nabc') and not block_is_open('"""a"""')
    assert message_text('"""\n\n  code\n"""') == "  code"
    assert message_text("  hi  ") == "hi"
    assert clean_text("ok\udcff") == "ok\ufffd"
    assert clean_text("\ud800") == "?"


def test_the_cli_starts_no_chat_with_a_prompt_and_session_is_a_one_shot_there(smollm2_path):
    result = run_cli("run", str(smollm2_path), "hi", "--session", "trip", "-n", "4",
                     "--temperature", "0")
    assert result.exit_code == 0 and ">>>" not in result.stdout + result.stderr
    assert [len(messages) for messages in stored()] == [2]  # recorded in the conversation trip
