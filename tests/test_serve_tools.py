"""Tools through `localchat serve`, with real chat templates that render them (Qwen2.5,
Hermes 3, Llama 3.1: fetched from llama-cpp-python's sdist at test time, `tool_templates`) in
copies of the SmolLM2 test model; and the stock SmolLM2, whose template has no tools."""

from __future__ import annotations

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
