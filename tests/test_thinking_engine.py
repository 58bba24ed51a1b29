"""Thinking models in the engine, with copies of the real test model that carry real thinking
templates (tests/thinking_models.py): the split, the switch, the budget, and the KV cache."""

from __future__ import annotations

import pytest

from localchat.engine.loader import load_engine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.engine.reasoning import ANSWER, REASONING
from localchat.errors import UsageError

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "Is 391 prime?"}]


@pytest.fixture(scope="module")
def engines(thinking_models):
    loaded = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in loaded:
            loaded[key] = load_engine(EngineOptions(model_path=thinking_models[name], n_ctx=1024,
                                                    threads=2, **options))
        return loaded[key]

    yield get
    for engine in loaded.values():
        engine.close()


def reply(engine, messages=QUESTION, **sampling):
    parts = list(engine.stream_parts(messages, Sampling(temperature=0, **sampling)))
    return ("".join(p.text for p in parts if p.kind == REASONING),
            "".join(p.text for p in parts if p.kind == ANSWER), engine.last_stats)


def test_what_each_template_says_about_thinking(engines):
    r1, old, qwen3 = engines("r1").thinking, engines("r1-old").thinking, engines("qwen3").thinking
    assert (r1.family.open, r1.switch, r1.opened_by_prompt) == ("<think>", None, True)
    assert (old.switch, old.opened_by_prompt) == (None, False)
    assert (qwen3.switch, qwen3.opened_by_prompt, qwen3.source) == (
        "enable_thinking", False, "chat template")
    # A built-in template knows nothing of thinking; the vocabulary still does.
    assert engines("r1", chat_format="chatml").thinking.source == "vocabulary"
    assert engines("r1-text", chat_format="chatml").thinking is None


def test_a_template_that_opens_the_block_makes_everything_reasoning(engines):
    reasoning, answer, stats = reply(engines("r1"), max_tokens=12)
    assert reasoning and answer == ""
    assert stats.finish_reason == "thinking"
    assert stats.reasoning_tokens == stats.completion_tokens == 12


@pytest.mark.parametrize("name", ["r1", "r1-text"])
def test_the_budget_closes_the_block_and_the_model_answers(engines, name):
    reasoning, answer, stats = reply(engines(name), max_tokens=30, think_budget=6)
    assert reasoning and answer.strip()
    closing = stats.reasoning_tokens - 6  # the closing marker's tokens, written for the model
    assert 1 <= closing <= 8
    assert stats.completion_tokens <= 30  # --max-tokens counts both parts
    assert "</think>" not in reasoning and not answer.startswith("</think>")


def test_budget_zero_answers_at_once(engines):
    reasoning, answer, stats = reply(engines("r1"), max_tokens=10, think_budget=0)
    assert reasoning == "" and answer
    assert stats.reasoning_tokens == 3  # "\n", "</think>" (a special token here), "\n\n"


def test_no_think_uses_the_templates_switch(engines):
    engine = engines("qwen3")
    assert engine.format_prompt(QUESTION, think=False).endswith("<think>\n\n</think>\n\n")
    assert engine.format_prompt(QUESTION).endswith("<|im_start|>assistant\n")
    reasoning, _, stats = reply(engine, max_tokens=8, think=False)
    assert reasoning == "" and stats.reasoning_tokens == 0  # the block was closed already


def test_no_think_without_a_switch_is_a_clear_error(engines):
    with pytest.raises(UsageError, match="cannot switch its thinking off") as caught:
        engines("r1").stream_parts(QUESTION, Sampling(think=False))
    assert "--think-budget 0" in caught.value.hint


def test_stop_strings_do_not_fire_inside_the_thinking(engines):
    free, _, _ = reply(engines("r1"), max_tokens=8)
    word = free.split()[0]
    reasoning, _, stats = reply(engines("r1"), max_tokens=8, stop=(word,))
    assert reasoning == free and stats.finish_reason == "thinking"


def test_the_next_turn_reuses_the_answer_past_the_dropped_thinking(engines):
    engine = engines("r1")
    _, answer, first = reply(engine, max_tokens=24, think_budget=6)
    assert answer.strip()
    turn2 = [*QUESTION, {"role": "assistant", "content": answer},
             {"role": "user", "content": "Why?"}]
    naive_reuse = first.prompt_tokens - 2  # up to <think>\n, where the template drops the rest
    _, _, second = reply(engine, turn2, max_tokens=4, think_budget=0)
    assert second.cached_tokens > naive_reuse
    # Every reused token is the prompt's own: a fresh engine gives the same prompt, same count.
    assert engine.count_tokens(turn2) == second.prompt_tokens
