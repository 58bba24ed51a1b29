"""The OpenAI wire format for `localchat serve`, replies: the bodies of a whole reply and of a
stream's chunks, usage and log-probabilities, no I/O. Small functions (`message`, `delta`,
`whole_reply`, `chunk`) that other fields can join.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localchat.engine.protocol import GenerationStats, TokenLogprob


@dataclass(frozen=True)
class ReplyMeta:
    """What every chunk of one reply repeats."""

    kind: str
    id: str
    created: int
    model: str


def model_entry(model_id: str, created: int, n_ctx: int) -> dict[str, Any]:
    """One /v1/models entry; max_model_len is vLLM's name for the context window."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "localchat",
            "max_model_len": n_ctx}


def usage(stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's token counts, with the KV-cache reuse where OpenAI reports cached tokens."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens}}


def new_meta(kind: str, id_suffix: str, model: str) -> ReplyMeta:
    """The id, time and model one reply's body or chunks carry."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return ReplyMeta(kind=kind, id=f"{prefix}-{id_suffix}", created=int(time.time()), model=model)


def finish_reason(reason: str) -> str:
    """OpenAI's word for how a reply ended: a full context window is its `length` too, and so
    is running out of tokens while thinking."""
    return "length" if reason in ("context", "thinking") else reason


def message(text: str, tool_calls: Sequence[dict[str, Any]] = (),
            reasoning: str = "") -> dict[str, Any]:
    """The assistant's message of a whole chat reply; a thinking model's thinking in
    `reasoning_content`, as llama-server and DeepSeek's API put it."""
    body: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls
                            else None}
    if reasoning:
        body["reasoning_content"] = reasoning
    if tool_calls:
        body["tool_calls"] = list(tool_calls)
    return body


def delta(text: str | None = None, opening: bool = False,
          tool_calls: Sequence[dict[str, Any]] = (), reasoning: str | None = None
          ) -> dict[str, Any]:
    """What one streamed chat event adds to the message: text, thinking
    (`reasoning_content`) or calls."""
    body: dict[str, Any] = {"role": "assistant", "content": ""} if opening else {}
    if text is not None:
        body["content"] = text
    if reasoning is not None:
        body["reasoning_content"] = reasoning
    if tool_calls:
        body["tool_calls"] = [{"index": index, **call} for index, call in enumerate(tool_calls)]
    return body


def whole_reply(meta: ReplyMeta, text: str, stats: GenerationStats, *,
                logprobs: Sequence[TokenLogprob] | None = None,
                tool_calls: Sequence[dict[str, Any]] = (), reasoning: str = "") -> dict[str, Any]:
    """The non-streaming answer."""
    finish = "tool_calls" if tool_calls else finish_reason(stats.finish_reason)
    if meta.kind == "chat":
        choice = {"index": 0, "message": message(text, tool_calls, reasoning),
                  "logprobs": chat_logprobs(logprobs), "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": text_logprobs(logprobs),
                  "finish_reason": finish}
    return {**_head(meta, streaming=False), "choices": [choice], "usage": usage(stats)}


def chunk(meta: ReplyMeta, text: str | None = None, finish: str | None = None,
          opening: bool = False, *, logprobs: Sequence[TokenLogprob] | None = None,
          tool_calls: Sequence[dict[str, Any]] = (), offset: int = 0,
          reasoning: str | None = None) -> dict[str, Any]:
    """One streamed event: the opening role, a piece of text or of thinking, calls, or the
    finish reason."""
    if meta.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": delta(text, opening, tool_calls,
                                                             reasoning),
                                  "logprobs": chat_logprobs(logprobs)}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": text_logprobs(logprobs, offset)}
    choice["finish_reason"] = finish_reason(finish) if finish else None
    return {**_head(meta, streaming=True), "choices": [choice]}


def _token_text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """The chat API's logprobs: each token with its bytes and its likeliest alternatives."""
    if entries is None:
        return None
    return {"content": [
        {"token": _token_text(entry.token), "logprob": entry.logprob,
         "bytes": list(entry.token),
         "top_logprobs": [{"token": _token_text(token), "logprob": logprob,
                           "bytes": list(token)} for token, logprob in entry.top]}
        for entry in entries], "refusal": None}


def text_logprobs(entries: Sequence[TokenLogprob] | None, offset: int = 0
                  ) -> dict[str, Any] | None:
    """The completions API's logprobs: parallel lists, offsets counted in characters."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(_token_text(entry.token))
    return {"tokens": [_token_text(entry.token) for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{_token_text(token): logprob for token, logprob in entry.top}
                             for entry in entries],
            "text_offset": offsets}


def usage_chunk(meta: ReplyMeta, stats: GenerationStats) -> dict[str, Any]:
    """The last event when the client asked for `stream_options.include_usage`."""
    return {**_head(meta, streaming=True), "choices": [], "usage": usage(stats)}


def _head(meta: ReplyMeta, streaming: bool) -> dict[str, Any]:
    if meta.kind == "chat":
        kind = "chat.completion.chunk" if streaming else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model}
