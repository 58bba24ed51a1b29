"""Thinking models through `localchat run`, `show` and `history`, in-process."""

from __future__ import annotations

import io
import json

import pyte
import pytest

from localchat.render import Environment, ThinkingView
from tests.cli_runner import run_cli

GREEDY = ("--temperature", "0", "--threads", "2", "--ctx", "512")


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_a_negative_budget_is_a_one_line_error():
    one_line_error(run_cli("run", "smollm2", "hi", "--think-budget", "-1"),
                   "--think-budget", "0 or more")


def test_think_and_no_think_are_one_flag_pair():
    result = run_cli("run", "--help")
    assert "--think" in result.stdout and "--no-think" in result.stdout
    assert "--show-thinking" in result.stdout and "--think-budget" in result.stdout


@pytest.mark.slow
def test_in_a_pipe_stdout_gets_only_the_answer(thinking_models):
    result = run_cli("run", str(thinking_models["r1"]), "Is 391 prime?", *GREEDY,
                     "-n", "24", "--think-budget", "6")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() and "</think>" not in result.stdout
    assert result.stderr == ""
    shown = run_cli("run", str(thinking_models["r1"]), "Is 391 prime?", *GREEDY,
                    "-n", "24", "--think-budget", "6", "--show-thinking")
    assert shown.stdout == result.stdout  # the same answer; the thinking went to stderr
    assert shown.stderr.strip() and "</think>" not in shown.stderr


@pytest.mark.slow
def test_json_keeps_the_reasoning_apart_and_counts_it(thinking_models):
    result = run_cli("run", str(thinking_models["r1"]), "Is 391 prime?", *GREEDY,
                     "-n", "24", "--think-budget", "6", "--json")
    record = json.loads(result.stdout)
    assert record["reasoning"] and record["text"]
    assert "</think>" not in record["text"] + record["reasoning"]
    assert 6 < record["reasoning_tokens"] < record["completion_tokens"] <= 24


@pytest.mark.slow
def test_out_of_tokens_while_thinking_says_so(thinking_models):
    result = run_cli("run", str(thinking_models["r1"]), "Is 391 prime?", *GREEDY, "-n", "8")
    assert result.exit_code == 0 and result.stdout == ""
    assert "still thinking" in result.stderr and "--think-budget" in result.stderr
    record = json.loads(run_cli("run", str(thinking_models["r1"]), "Is 391 prime?", *GREEDY,
                                "-n", "8", "--json").stdout)
    assert record["finish_reason"] == "thinking" and record["text"] == ""


@pytest.mark.slow
def test_no_think_on_a_model_that_cannot_switch_is_a_one_line_error(thinking_models):
    one_line_error(run_cli("run", str(thinking_models["r1"]), "hi", *GREEDY, "--no-think"),
                   "cannot switch its thinking off")


@pytest.mark.slow
def test_show_says_whether_a_model_thinks_and_can_stop(thinking_models, smollm2_path):
    r1 = run_cli("show", str(thinking_models["r1"])).stdout
    assert "thinks" in r1 and "<think>...</think>" in r1 and "--think-budget 0" in r1
    qwen3 = json.loads(run_cli("show", str(thinking_models["qwen3"]), "--json").stdout)
    assert qwen3["thinking"]["switch"] == "enable_thinking"
    plain = json.loads(run_cli("show", str(smollm2_path), "--json").stdout)
    assert plain["thinking"] is None


@pytest.mark.slow
def test_history_keeps_the_thinking_and_shows_it_marked(thinking_models):
    run_cli("run", str(thinking_models["r1"]), "Is 391 prime?", *GREEDY, "-n", "20",
            "--think-budget", "4")
    shown = run_cli("history", "show", "1").stdout
    assert "(thinking)" in shown and "  | " in shown
    exported = run_cli("history", "export", "1").stdout
    assert "> **Thinking**" in exported
    message = json.loads(run_cli("history", "export", "1", "--format", "json").stdout)[
        "messages"][-1]
    assert message["reasoning"] and "</think>" not in message["content"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_thinking_view_folds_at_a_terminal_shows_on_request_and_hides_in_a_pipe():
    folded = Environment(stdin=io.StringIO(), stdout=Terminal(), stderr=io.StringIO())
    view = ThinkingView(folded, hint="/thinking shows it")
    view.feed("first step ", 1)
    view.feed("second step", 2)
    view.finish()
    view.finish()  # safe to repeat
    screen = pyte.Screen(80, 24)
    pyte.ByteStream(screen).feed(folded.stdout.getvalue().encode())
    shown = "\n".join(line.rstrip() for line in screen.display).strip()
    assert shown.startswith("thought for ") and shown.endswith("s, 2 tokens; /thinking shows it")
    assert "step" not in shown

    shown_env = Environment(stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    view = ThinkingView(shown_env, show=True)
    view.feed("all of it")
    view.finish()
    assert shown_env.stderr.getvalue() == "all of it\n" and shown_env.stdout.getvalue() == ""

    piped = Environment(stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    view = ThinkingView(piped)
    view.feed("hidden")
    view.finish()
    assert piped.stdout.getvalue() == piped.stderr.getvalue() == ""
