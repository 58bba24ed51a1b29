"""`localchat serve` with a thinking model: reasoning_content, the switch and the budget, through
the official openai client; and `run --endpoint` reading the thinking back apart."""

from __future__ import annotations

import json

import openai
import pytest

from localchat.engine.protocol import Sampling
from localchat.serve.openai_api import ApiError, parse_request
from tests.cli_runner import run_cli
from tests.test_server import KEY, THREADS, ServeProcess, _environment

QUESTION = [{"role": "user", "content": "Is 391 prime?"}]
MODEL = "smollm2-r1"  # the served id: the file's name (a request for another model is a 404)


def test_chat_template_kwargs_takes_the_thinking_switch_only():
    request = parse_request("chat", {"messages": QUESTION, "think_budget": 5,
                                     "chat_template_kwargs": {"enable_thinking": False}},
                            Sampling())
    assert (request.sampling.think, request.sampling.think_budget) == (False, 5)
    for bad, param in (({"enable_thinking": "no"}, "chat_template_kwargs.enable_thinking"),
                       ({"tools_in_system": True}, "chat_template_kwargs.tools_in_system"),
                       ([], "chat_template_kwargs")):
        with pytest.raises(ApiError) as caught:
            parse_request("chat", {"messages": QUESTION, "chat_template_kwargs": bad},
                          Sampling())
        assert caught.value.status == 400 and caught.value.param == param
    with pytest.raises(ApiError, match="think_budget must be 0 or more"):
        parse_request("chat", {"messages": QUESTION, "think_budget": -1}, Sampling())


def test_a_replayed_reply_may_carry_its_reasoning_content():
    replay = [*QUESTION, {"role": "assistant", "content": "No.", "reasoning_content": "17*23"},
              {"role": "user", "content": "Sure?"}]
    messages = parse_request("chat", {"messages": replay}, Sampling()).messages
    assert messages[1] == {"role": "assistant", "content": "No."}


@pytest.fixture(scope="module")
def server(thinking_models, tmp_path_factory):
    serve = ServeProcess([str(thinking_models["r1"]), "--port", "0", "--api-key", KEY,
                          "--ctx", "1024", *THREADS], _environment(tmp_path_factory.mktemp("h")))
    line = serve.wait_for("serving ")
    serve.url = line.split(" at ", 1)[1].split(" ", 1)[0]
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.slow
def test_the_reply_carries_reasoning_content_apart(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=24, extra_body={"think_budget": 6})
    message = reply.choices[0].message
    assert message.content and message.model_extra["reasoning_content"]
    assert "</think>" not in message.content
    assert reply.usage.completion_tokens_details.reasoning_tokens > 6


@pytest.mark.slow
def test_streaming_sends_delta_reasoning_content_first(client):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                            max_tokens=24, stream=True,
                                            extra_body={"think_budget": 6})
    kinds = []
    for event in stream:
        for choice in event.choices:
            delta = choice.delta
            if (delta.model_extra or {}).get("reasoning_content"):
                kinds.append("reasoning")
            if delta.content:
                kinds.append("answer")
    assert kinds and kinds[0] == "reasoning" and "answer" in kinds
    assert kinds.index("answer") > max(i for i, k in enumerate(kinds) if k == "reasoning")


@pytest.mark.slow
def test_no_switch_in_the_template_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="cannot switch its thinking off"):
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=4,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}})


@pytest.mark.slow
def test_run_with_an_endpoint_keeps_the_thinking_apart(server):
    result = run_cli("run", "--endpoint", server.url, "--api-key", KEY, MODEL, "Is 391 prime?",
                     "--temperature", "0", "-n", "24", "--think-budget", "6", "--json")
    record = json.loads(result.stdout)
    assert record["reasoning"] and record["text"] and "</think>" not in record["text"]
    assert record["reasoning_tokens"] > 6


# ---- the remote engine reading a server's thinking (a fake server, no model) -----------------


def test_the_remote_engine_splits_reasoning_content_and_markers_left_in():
    from localchat.engine.reasoning import ANSWER, REASONING
    from localchat.engine.remote import RemoteEngine, remote_options
    from tests.test_remote import FakeServer, delta, models, sse

    def thinking_delta(text):
        return {"choices": [{"index": 0, "delta": {"reasoning_content": text}}]}

    for events in ([thinking_delta("17 x 23"), thinking_delta(" = 391"), delta("No."),
                    delta(finish="stop")],
                   [delta("<th"), delta("ink>17 x 23 = 391</think>"), delta("\n\nNo."),
                    delta(finish="stop")]):
        server = FakeServer({("GET", "/v1/models"): models({"id": "m"}),
                             ("POST", "/v1/chat/completions"): sse(*events)})
        try:
            engine = RemoteEngine(remote_options(server.url, "m", None))
            parts = list(engine.stream_parts(QUESTION, Sampling(temperature=0, think=False,
                                                                think_budget=8)))
        finally:
            server.close()
        assert "".join(p.text for p in parts if p.kind == REASONING) == "17 x 23 = 391"
        assert "".join(p.text for p in parts if p.kind == ANSWER) == "No."
        body = server.requests[-1]["body"]
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert body["think_budget"] == 8


@pytest.mark.slow
def test_ollamas_api_sends_the_thinking_in_message_thinking(server):
    import ollama

    local = ollama.Client(host=server.url.removesuffix("/v1"),
                          headers={"Authorization": f"Bearer {KEY}"})
    assert "thinking" in local.show(MODEL).capabilities
    reply = local.chat(model=MODEL, messages=QUESTION, options={"temperature": 0,
                                                                "num_predict": 12})
    assert reply.message.thinking and reply.done_reason == "length"  # still thinking at 12
    assert "<think>" not in reply.message.content
    parts = list(local.chat(model=MODEL, messages=QUESTION, stream=True,
                            options={"temperature": 0, "num_predict": 12}))
    assert "".join(part.message.thinking or "" for part in parts) == reply.message.thinking
