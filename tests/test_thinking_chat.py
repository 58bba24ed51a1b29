"""Thinking models in the chat: /think, /thinking, /stats, the fold at a terminal, the history
and the KV cache across turns (the R1-style copy of the test model: tests/thinking_models.py)."""

from __future__ import annotations

import pyte
import pytest

from localchat.chat.session import ReplOptions
from localchat.engine.loader import load_engine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.history.records import open_history
from tests.chat_harness import TerminalText, chat, error_lines

pytestmark = pytest.mark.slow
BUDGETED = Sampling(temperature=0.0, max_tokens=20, think_budget=4)


@pytest.fixture(scope="module")
def r1(thinking_models):
    loaded = load_engine(EngineOptions(model_path=thinking_models["r1"], n_ctx=1024, threads=1))
    yield loaded
    loaded.close()


@pytest.fixture
def fresh(r1):
    r1.reset_cache()
    return r1


def test_thinking_is_kept_apart_shown_on_request_and_saved(fresh):
    result = chat(fresh, "Is 391 prime?\r/thinking\r/stats\r", sampling=BUDGETED)
    assert not error_lines(result.stderr), result.stderr
    with open_history() as store:
        reply = store.messages(1)[-1]
    assert reply.reasoning and reply.content
    assert "</think>" not in reply.content + reply.reasoning
    answer_at = result.stdout.index(reply.content)
    assert result.stdout.index(reply.reasoning, answer_at) > answer_at  # /thinking, after it
    assert "thinking  " in result.stdout and "of the reply's tokens" in result.stdout


def test_the_second_turn_reuses_the_answer_after_the_dropped_thinking(fresh):
    result = chat(fresh, "Is 391 prime?\rWhy?\r/stats\r", sampling=BUDGETED)
    stats = fresh.last_stats
    with open_history() as store:
        first_answer = store.messages(1)[1]
    # The template dropped the thinking; the cache kept the answer after it anyway.
    answer_tokens = len(fresh._tokenizer.tokenize(first_answer.content.encode(),
                                                 add_special=False, parse_special=False))
    assert stats.cached_tokens >= 20 + min(answer_tokens, 3)
    assert f"{stats.cached_tokens} reused from the cache" in result.stdout


def test_think_commands_and_their_errors(fresh):
    result = chat(fresh, "/think maybe\r/think off\r/think budget 3\r/think\r/think budget x\r")
    errors = error_lines(result.stderr)
    assert len(errors) == 3, result.stderr
    assert "usage: /think on|off" in errors[0]
    assert "cannot switch its thinking off" in errors[1] and "/think budget 0" in result.stderr
    assert "think_budget = 3" in result.stderr
    assert "thinking the model's default, budget 3" in result.stderr
    assert "/set think_budget must be" in errors[2]


def test_at_a_terminal_the_thinking_folds_to_one_line(fresh):
    stdout = TerminalText()
    chat(fresh, "Is 391 prime?\r", sampling=BUDGETED, stdout=stdout)
    screen = pyte.Screen(100, 30)
    pyte.ByteStream(screen).feed(stdout.getvalue().encode())
    shown = "\n".join(line.rstrip() for line in screen.display)
    with open_history() as store:
        reply = store.messages(1)[-1]
    assert "thought for " in shown and "tokens; /thinking shows it" in shown
    assert reply.reasoning.strip() not in shown  # folded away
    assert reply.content.split()[0] in shown  # the answer stays


def test_a_snapshot_keeps_the_answer_without_the_thinking_and_resumes_instantly(fresh):
    named = ReplOptions(markdown=False, session="primes")
    chat(fresh, "Is 391 prime?\r", sampling=BUDGETED, options=named)
    first = fresh.last_stats
    fresh.reset_cache()
    result = chat(fresh, "Why?\r", sampling=BUDGETED, options=named, verbose=True)
    note = next(line for line in result.stderr.splitlines() if "resumed from a snapshot" in line)
    reused = int(note.split("snapshot: ")[1].split(" of ")[0])
    # All of the first prompt but its <think>\n, and the answer after the thinking.
    assert reused > first.prompt_tokens - 2
    assert fresh.last_stats.cached_tokens == reused
