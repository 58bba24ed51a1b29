"""The reasoning splitter and the reply text filter, driven by hand-made token streams."""

from __future__ import annotations

from pathlib import Path

import pytest

from localchat.engine import reasoning
from localchat.engine.reasoning import ANSWER, REASONING, Part, Splitter, family_named
from localchat.engine.reply_text import ReplyText

THINK = family_named("think")
SEED = family_named("seed")
DATA = Path(__file__).parent / "data"


def run(pieces, family=THINK, inside=False):
    splitter = Splitter(family, inside)
    parts = [part for piece in pieces for part in splitter.feed(piece)] + splitter.finish()
    return parts, splitter


def joined(parts, kind):
    return "".join(part.text for part in parts if part.kind == kind)


def test_a_reply_that_opens_and_closes_its_block():
    parts, splitter = run(["<think>", "\n", "Let me", " see.", "\n", "</think>", "\n\n", "Yes."])
    assert joined(parts, REASONING) == "Let me see."
    assert joined(parts, ANSWER) == "Yes."
    assert splitter.closed and not splitter.thinking
    assert [part.kind for part in parts] == [REASONING, REASONING, ANSWER]


def test_reasoning_streams_before_the_block_closes():
    splitter = Splitter(THINK)
    assert splitter.feed("<think>Step one") == [Part(REASONING, "Step one")]
    assert splitter.thinking
    assert splitter.feed(", step two") == [Part(REASONING, ", step two")]


@pytest.mark.parametrize("cut", range(1, 30))
def test_markers_cut_across_tokens_anywhere(cut):
    text = "<think>\nhmm, 391 = 17 * 23\n</think>\n\nNo, 391 = 17 x 23."
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    parts, _ = run(pieces)
    assert joined(parts, REASONING) == "hmm, 391 = 17 * 23"
    assert joined(parts, ANSWER) == "No, 391 = 17 x 23."


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_a_reply_that_starts_inside_the_block_the_template_opened(cut):
    text = "\nI should check.\n</think>\n\nDone."
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    parts, splitter = run(pieces, inside=True)
    assert joined(parts, REASONING) == "I should check."
    assert joined(parts, ANSWER) == "Done."
    assert splitter.closed


def test_a_block_never_closed_is_all_reasoning_and_no_answer():
    parts, splitter = run(["<think>", "thinking and", " thinking </th"])
    assert joined(parts, REASONING) == "thinking and thinking </th"
    assert joined(parts, ANSWER) == ""
    assert splitter.thinking and not splitter.closed


def test_a_reply_without_a_block_is_all_answer():
    parts, _ = run([" ", "Hello", " <think> is a tag"])
    assert joined(parts, REASONING) == ""
    assert joined(parts, ANSWER) == " Hello <think> is a tag"


def test_something_that_only_looks_like_the_start_of_a_marker_is_answer():
    parts, _ = run(["<th", "ree> items"])
    assert joined(parts, ANSWER) == "<three> items"
    parts, _ = run(["<thi"])
    assert joined(parts, ANSWER) == "<thi"


def test_a_second_block_is_plain_answer_text():
    parts, _ = run(["<think>a</think>b<think>c</think>"])
    assert joined(parts, REASONING) == "a"
    assert joined(parts, ANSWER) == "b<think>c</think>"


def test_no_family_means_no_splitting():
    parts, _ = run(["<think>a</think>b"], family=None)
    assert parts == [Part(ANSWER, "<think>a</think>b")]


def test_other_families_markers():
    parts, _ = run(["<seed:th", "ink>plan</seed:", "think>answer"], family=SEED)
    assert (joined(parts, REASONING), joined(parts, ANSWER)) == ("plan", "answer")


def test_an_empty_block_the_template_closed_gives_only_the_answer():
    # Qwen3 with enable_thinking=false: the prompt holds <think>\n\n</think>\n\n already.
    parts, _ = run(["\n\n", "Hi"])
    assert parts == [Part(ANSWER, "\n\nHi")]
    assert reasoning.split_text("<think>\n\n</think>\n\nHi", THINK) == ("", "Hi")


# ---- stop strings: never inside the thinking ---------------------------------------------------


def feed_all(reply, pieces):
    parts = [part for piece in pieces for part in reply.feed(piece)]
    return parts + reply.finish()


def test_a_stop_string_inside_the_thinking_does_not_fire():
    reply = ReplyText(stops=["\n\n"], family=THINK)
    parts = feed_all(reply, ["<think>", "first\n\nsecond", "</think>", "answer\n", "\nmore"])
    assert joined(parts, REASONING) == "first\n\nsecond"
    assert joined(parts, ANSWER) == "answer"
    assert reply.stopped


def test_a_stop_string_cut_across_tokens_in_the_answer():
    reply = ReplyText(stops=["END"], family=THINK)
    parts = feed_all(reply, ["<think>E", "N", "D</think>ok E", "N", "D and on"])
    assert joined(parts, REASONING) == "END"
    assert joined(parts, ANSWER) == "ok "
    assert reply.stopped


def test_held_text_that_was_not_a_stop_comes_out_at_the_end():
    reply = ReplyText(stops=["END"], family=THINK)
    parts = feed_all(reply, ["<think>x</think>", "the E", "N"])
    assert joined(parts, ANSWER) == "the EN"
    assert not reply.stopped


def test_leading_spaces_of_a_chat_reply_are_dropped():
    reply = ReplyText(strip_leading=True)
    assert feed_all(reply, [" ", " Hi"]) == [Part(ANSWER, "Hi")]


# ---- knowing a thinking model from its template and vocabulary -------------------------------


def test_families_from_real_templates():
    qwen3 = (DATA / "qwen3.jinja").read_text()
    r1_old = (DATA / "deepseek-r1-distill-qwen-7b.jinja").read_text()
    r1_new = (DATA / "deepseek-r1-distill-llama-8b.jinja").read_text()
    assert reasoning.family_in_template(qwen3) == THINK
    assert reasoning.switch_in_template(qwen3) == "enable_thinking"
    assert reasoning.family_in_template(r1_old) == THINK
    assert reasoning.switch_in_template(r1_old) is None
    assert reasoning.family_in_template(r1_new) == THINK
    assert reasoning.family_in_template("{{ messages }}") is None


def test_families_from_the_vocabulary():
    assert reasoning.family_in_vocabulary({"<|im_start|>", "<think>", "</think>"}) == THINK
    assert reasoning.family_in_vocabulary({"<|im_start|>", "<think>"}) is None


def test_a_prompt_that_leaves_the_block_open():
    assert reasoning.opens_block("<｜Assistant｜><think>\n", THINK)
    assert not reasoning.opens_block("<|im_start|>assistant\n<think>\n\n</think>\n\n", THINK)
    assert not reasoning.opens_block("<|im_start|>assistant\n", THINK)
