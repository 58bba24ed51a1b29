"""The OpenAI wire format's reply bodies, without a server or a model."""

from __future__ import annotations

import pytest

from localchat.engine.protocol import GenerationStats, Sampling
from localchat.serve import openai_api as api
from localchat.serve import openai_replies as replies


def stats(finish_reason: str) -> GenerationStats:
    return GenerationStats(prompt_tokens=60, cached_tokens=0, completion_tokens=4, ttft_s=0.1,
                           prefill_s=0.1, decode_s=0.1, finish_reason=finish_reason)


def test_a_full_context_window_is_openais_length():
    for kind in ("chat", "text"):
        meta = replies.new_meta(kind, "abc", "m")
        assert replies.whole_reply(meta, "hi", stats("context"))["choices"][0]["finish_reason"] == \
            "length"
        assert replies.chunk(meta, finish="context")["choices"][0]["finish_reason"] == "length"
        assert replies.chunk(meta, finish="stop")["choices"][0]["finish_reason"] == "stop"
        assert replies.chunk(meta, text="a")["choices"][0]["finish_reason"] is None


@pytest.mark.parametrize("role", [["user"], {"name": "user"}, None, 5])
def test_a_role_that_is_not_text_is_a_400_naming_it(role):
    body = {"messages": [{"role": role, "content": "hi"}]}
    with pytest.raises(api.ApiError) as raised:  # an unhashable role was once a TypeError
        api.parse_request("chat", body, Sampling())
    assert (raised.value.status, raised.value.param) == (400, "messages[0].role")
