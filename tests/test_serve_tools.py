"""Tools through `localchat serve`, with real chat templates that render them (Qwen2.5,
Hermes 3, Llama 3.1: fetched from llama-cpp-python's sdist at test time, `tool_templates`) in
copies of the SmolLM2 test model; and the stock SmolLM2, whose template has no tools."""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from serve_process import ServeProcess, environment
from tool_templates import model_with_template

pytestmark = pytest.mark.slow

STYLES = ("qwen2.5", "hermes3", "llama3.1")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tool-models")
    copies = [model_with_template(smollm2_path, folder / f"smollm2-{name}.gguf", name)
              for name in STYLES]
    serve = ServeProcess([*map(str, copies), str(smollm2_path), "--port", "0", "--threads",
                          "1"], environment(tmp_path_factory.mktemp("tools-home"))).started()
    yield serve
    assert serve.stop() == 130
    assert not any("Traceback" in line for line in serve.log), serve.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=180)


def prompt_tokens(client, model: str, **extra) -> int:
    return client.chat.completions.create(model=model, messages=extra.pop("messages", ASK),
                                          max_tokens=1, temperature=0,
                                          **extra).usage.prompt_tokens


@pytest.mark.parametrize("style", STYLES)
def test_the_template_renders_the_tools_and_earlier_calls(client, style):
    model = f"smollm2-{style}"
    without = prompt_tokens(client, model)
    with_tools = prompt_tokens(client, model, tools=[WEATHER])
    assert with_tools > without + 20  # the definitions reached the prompt
    assert prompt_tokens(client, model, tools=[WEATHER], tool_choice="none") == without
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    assert prompt_tokens(client, model, tools=[WEATHER], messages=history) > with_tools


def test_a_template_without_tools_is_a_400_that_says_so(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=ASK,
                                       tools=[WEATHER], max_tokens=1)
    assert caught.value.code == "tools_not_supported"
    assert "does not render tools" in caught.value.message
    local = ollama.Client(host=server.base, timeout=180)
    with pytest.raises(ollama.ResponseError) as refused:
        local.chat(model="SmolLM2-135M-Instruct.Q4_1", messages=ASK, tools=[WEATHER])
    assert refused.value.status_code == 400 and "does not support tools" in refused.value.error
    assert "tools" in local.show("smollm2-qwen2.5").capabilities
    assert "tools" not in local.show("SmolLM2-135M-Instruct.Q4_1").capabilities


def test_ollama_chat_takes_tools_and_tool_results(server):
    local = ollama.Client(host=server.base, timeout=180)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": '{"celsius": 21}', "tool_name": "get_weather"}]
    reply = local.chat(model="smollm2-qwen2.5", messages=history, tools=[WEATHER],
                       options={"temperature": 0, "num_predict": 8})
    assert reply.done and reply.prompt_eval_count > 100


@pytest.mark.parametrize("style", STYLES)
def test_a_required_call_is_grammar_constrained_and_parsed(client, style):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model=f"smollm2-{style}", messages=ASK, tools=[WEATHER, other], tool_choice=choice,
            temperature=0, max_tokens=60).choices[0]
        assert reply.finish_reason == "tool_calls" and not reply.message.content
        call = reply.message.tool_calls[0]
        arguments = json.loads(call.function.arguments)
        if choice == "required":
            assert call.function.name in ("get_weather", "get_time")
        else:
            assert call.function.name == "get_weather" and isinstance(arguments["city"], str)
        assert call.id.startswith("call_") and call.type == "function"
    streamed = list(client.chat.completions.create(
        model=f"smollm2-{style}", messages=ASK, tools=[WEATHER], tool_choice="required",
        temperature=0, max_tokens=60, stream=True))
    calls = [c.choices[0].delta.tool_calls for c in streamed if c.choices and
             c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "get_weather"
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_auto_leaves_the_model_free_and_a_schema_beyond_the_grammar_is_a_400(client, server):
    reply = client.chat.completions.create(model="smollm2-qwen2.5", messages=ASK,
                                           tools=[WEATHER], temperature=0, max_tokens=8)
    choice = reply.choices[0]
    assert choice.message.content or choice.message.tool_calls  # free text, or a valid call
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-qwen2.5", messages=ASK, tools=[bad],
                                       max_tokens=1)
    assert caught.value.param == "tools" and "'minimum'" in caught.value.message
    local = ollama.Client(host=server.base, timeout=180)
    answered = local.chat(model="smollm2-hermes3", messages=ASK, tools=[WEATHER],
                          options={"temperature": 0, "num_predict": 8})
    assert answered.done
