"""Reusing llama.cpp's KV cache from one reply to the next: the prompt prefix the cache already
holds, and the last answer past the thinking that the chat template dropped.

Thinking templates (Qwen3's, the R1 distills') replay an earlier reply without its thinking, so
the next prompt leaves the cache where the last reply's thinking began, and the answer after it
would be processed again. When the next prompt's tokens there are the answer's own, the
thinking's cells are removed and the answer's shifted down to follow the prompt (llama.cpp's
K-shift, as llama-server's `--cache-reuse` does): only what really changed is processed. Every
reused token is checked equal to the new prompt's; the answer's cells keep the attention they
had to the thinking when they were made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# How far before the reply a thinking block may begin (a generation prompt's "<think>\n").
OPENER_ROOM = 8
# How far from the closing marker the answer's first token may lie (the blank line after it).
ANSWER_SLACK = 2


@dataclass(frozen=True)
class LastReply:
    """Where the last reply sits in the cache: its prompt's length, where its answer began."""

    prompt_tokens: int
    answer_at: int | None  # None: the reply had no closed thinking block


def shared_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    shared = 0
    for old, new in zip(first, second, strict=False):
        if old != new:
            break
        shared += 1
    return shared


def reuse(llama: Any, tokens: list[int], last: LastReply | None, can_shift: bool) -> int:
    """Keep the cache `tokens` can reuse, drop the rest; return how many tokens it covers."""
    cached = llama.input_ids[: llama.n_tokens].tolist()
    shared = shared_prefix(cached, tokens)
    if can_shift and last is not None:
        shared += keep_answer_past_thinking(llama, cached, tokens, shared, last)
    shared = min(shared, len(tokens) - 1)  # the last prompt token must be evaluated for logits
    if shared > 0 and llama._ctx.kv_cache_seq_rm(-1, shared, -1):
        llama.n_tokens = shared
        return shared
    llama.reset()
    return 0


def keep_answer_past_thinking(llama: Any, cached: list[int], tokens: list[int], shared: int,
                              last: LastReply) -> int:
    """Move the last answer's cells to follow the shared prefix when the new prompt goes on
    with that answer; return how many more tokens are reused (0: nothing moved)."""
    if last.answer_at is None or shared >= len(tokens):
        return 0
    if not last.prompt_tokens - OPENER_ROOM <= shared <= last.answer_at:
        return 0  # the prompt parts before the last reply: not a dropped thinking block
    best, resume = 0, 0
    for at in range(max(last.answer_at - ANSWER_SLACK, shared + 1),
                    min(last.answer_at + ANSWER_SLACK + 1, len(cached))):
        length = shared_prefix(cached[at:], tokens[shared:])
        if length > best:
            best, resume = length, at
    if best == 0:
        return 0
    ctx = llama._ctx
    ctx.kv_cache_seq_rm(0, shared, resume)  # the thinking
    ctx.kv_cache_seq_shift(0, resume, resume + best, shared - resume)  # the answer, moved down
    ctx.kv_cache_seq_rm(0, shared + best, -1)  # whatever followed it
    llama.input_ids[shared: shared + best] = cached[resume: resume + best]
    llama.n_tokens = shared + best
    return best
