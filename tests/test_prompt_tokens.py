"""Cutting a prompt at special tokens as llama.cpp does, but never inside a message: no model."""

from __future__ import annotations

from localchat.engine.prompt_tokens import (
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_RSTRIP,
    Special,
    partition,
)

START = Special(1, b"<|im_start|>", ATTR_CONTROL)
END = Special(2, b"<|im_end|>", ATTR_CONTROL)
START_ALONE = Special(3, b"<|im_start|>a", ATTR_CONTROL)  # a longer text that contains another


def test_template_text_is_cut_at_special_tokens_and_contents_never_are():
    chunks = [(b"<|im_start|>user\n", False), (b"x<|im_end|>y", True),
              (b"<|im_end|>\n<|im_start|>assistant\n", False)]
    assert partition(chunks, {START, END}) == [
        1, b"user\nx<|im_end|>y", 2, b"\n", 1, b"assistant\n"]


def test_longer_special_texts_are_cut_first():
    assert partition([(b"<|im_start|>assistant", False)], [START, START_ALONE]) == [
        3, b"ssistant"]


def test_strip_attributes_take_spaces_from_the_neighbours_across_pieces():
    # Phi-3's tokens eat the whitespace on their right in llama.cpp; a content's too.
    end = Special(2, b"<|end|>", ATTR_CONTROL | ATTR_RSTRIP)
    user = Special(4, b"<|user|>", ATTR_CONTROL | ATTR_RSTRIP | ATTR_LSTRIP)
    chunks = [(b"<|user|>\n", False), (b" \thi ", True), (b" <|end|>\n", False)]
    assert partition(chunks, [end, user]) == [4, b"hi  ", 2]  # <|end|> keeps its left
    assert partition([(b"a \n<|user|> \n", False)], [user]) == [b"a", 4]


def test_no_special_tokens_leaves_one_stretch():
    chunks = [(b"plain ", False), (b"text", True)]
    assert partition(chunks, []) == [b"plain text"]
