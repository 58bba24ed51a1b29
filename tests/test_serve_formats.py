"""The server's wire formats without a socket or a model: OpenAI's logit_bias, logprobs, tools
and response_format, Ollama's requests and replies, tool-call parsing, and bounded JSON."""

from __future__ import annotations

import json

import pytest

from localchat.engine.protocol import GenerationStats, Sampling, TokenLogprob
from localchat.engine.templates import ChatTemplate, renders_tools
from localchat.serve import ollama_api, tools
from localchat.serve import openai_api as api
from localchat.serve import openai_replies as replies
from localchat.serve.http import MAX_NESTING, decode_json
from localchat.serve.openai_api import ApiError, parse_request
from localchat.serve.server import serve_settings

HELLO = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
STATS = GenerationStats(prompt_tokens=30, cached_tokens=4, completion_tokens=3, ttft_s=0.1,
                        prefill_s=0.05, decode_s=0.2, finish_reason="stop")


def chat(**fields) -> api.Request:
    return parse_request("chat", {"messages": HELLO, **fields}, Sampling())


def refused(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    assert caught.value.status == 400
    return caught.value


# ---- OpenAI: the fields that used to be refused ------------------------------------------------

def test_logit_bias_maps_token_ids_and_checks_the_range():
    assert chat(logit_bias={"15": -100, " 7": 2.5}).options.logit_bias == {15: -100.0, 7: 2.5}
    assert refused(chat, logit_bias={"x": 1}).param == "logit_bias"
    assert "[-100, 100]" in refused(chat, logit_bias={"3": 101}).message
    assert refused(chat, logit_bias=[1]).param == "logit_bias"
    assert chat().options.logit_bias == {}


def test_logprobs_chat_and_completions():
    assert chat().options.logprobs is None
    assert chat(logprobs=True).options.logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).options.logprobs == 5
    assert refused(chat, top_logprobs=2).param == "top_logprobs"  # needs logprobs: true
    assert refused(chat, logprobs=True, top_logprobs=21).param == "top_logprobs"
    text = parse_request("text", {"prompt": "a", "logprobs": 3}, Sampling())
    assert text.options.logprobs == 3


def test_tools_tool_choice_and_earlier_calls_in_the_messages():
    request = chat(tools=[WEATHER])
    assert request.tool_choice == "auto" and request.options.tools[0]["function"]["name"] == \
        "get_weather"
    assert chat(tools=[WEATHER], tool_choice="none").options.tools == ()  # not even rendered
    named = chat(tools=[WEATHER], tool_choice={"type": "function",
                                                "function": {"name": "get_weather"}})
    assert (named.tool_choice, named.tool_name) == ("function", "get_weather")
    assert "not in 'tools'" in refused(chat, tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "other"}}).message
    assert refused(chat, tool_choice="required").param == "tool_choice"  # and no tools
    assert refused(chat, tools=[{"type": "function", "function": {"name": "a b"}}]).param == \
        "tools[0].function.name"
    assert "same name" in refused(chat, tools=[WEATHER, WEATHER]).message
    messages = [*HELLO,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}]
    checked = parse_request("chat", {"messages": messages, "tools": [WEATHER]}, Sampling())
    assert checked.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert checked.messages[1]["content"] == ""
    assert checked.messages[2] == {"role": "tool", "content": '{"temp": 21}',
                                   "tool_call_id": "c1"}
    replay = [*HELLO, {"role": "assistant", "content": "No.", "reasoning_content": "17*23"}]
    assert parse_request("chat", {"messages": replay}, Sampling()).messages[1] == {
        "role": "assistant", "content": "No."}  # an earlier reply's thinking is dropped


def test_response_format_and_stream_options():
    assert chat().response_format.type == "text"
    assert chat(response_format={"type": "json_object"}).response_format.type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    form = chat(response_format={"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": schema}}).response_format
    assert (form.type, form.schema, form.name) == ("json_schema", schema, "x")
    assert refused(chat, response_format={"type": "yaml"}).param == "response_format"
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert refused(chat, stream_options={"include_usage": True}).param == "stream_options"


def test_reply_bodies_carry_logprobs_and_tool_calls():
    entries = [TokenLogprob(b"Hi", -0.5, ((b"Hi", -0.5), (b"Hello", -1.5))),
               TokenLogprob(b"\xe2", -0.1)]
    meta = replies.new_meta("chat", "x", "m")
    whole = replies.whole_reply(meta, "Hi", STATS, logprobs=entries)
    content = whole["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
        {"token": "Hello", "logprob": -1.5, "bytes": [72, 101, 108, 108, 111]}]}
    assert content[1]["bytes"] == [0xE2]  # part of a character: the bytes tell the rest
    assert replies.whole_reply(meta, "Hi", STATS)["choices"][0]["logprobs"] is None
    call = tools.ToolCall("get_weather", '{"city": "Paris"}', "call_1").openai()
    called = replies.whole_reply(meta, "", STATS, tool_calls=[call])["choices"][0]
    assert called["finish_reason"] == "tool_calls"
    assert called["message"] == {"role": "assistant", "content": None, "tool_calls": [call]}
    streamed = replies.chunk(meta, tool_calls=[call])["choices"][0]["delta"]["tool_calls"][0]
    assert streamed["index"] == 0 and streamed["function"]["name"] == "get_weather"
    text = replies.chunk(replies.new_meta("text", "y", "m"), text="Hi", logprobs=entries[:1],
                         offset=7)
    assert text["choices"][0]["logprobs"] == {"tokens": ["Hi"], "token_logprobs": [-0.5],
                                              "top_logprobs": [{"Hi": -0.5, "Hello": -1.5}],
                                              "text_offset": [7]}


# ---- Ollama ------------------------------------------------------------------------------------

def test_ollama_options_are_the_settings_tables_column():
    request = ollama_api.parse_chat({"model": "m", "messages": HELLO, "options": {
        "temperature": 0, "num_predict": 12, "stop": "END", "num_ctx": 2048, "top_k": 5,
        "mirostat": 0, "num_batch": 512, "seed": 3}}, Sampling())
    assert (request.sampling.temperature, request.sampling.max_tokens) == (0.0, 12)
    assert request.sampling.stop == ("END",) and request.sampling.seed == 3
    assert request.load == {"ctx": 2048} and request.stream  # Ollama streams unless told not
    unlimited = ollama_api.parse_chat({"model": "m", "messages": HELLO,
                                       "options": {"num_predict": -1}}, Sampling(max_tokens=9))
    assert unlimited.sampling.max_tokens == 9  # -1: no limit of the request's own
    assert "unknown option 'temprature'" in refused(
        ollama_api.parse_chat, {"model": "m", "options": {"temprature": 1}}, Sampling()).message
    assert "mirostat = 2 is not supported" in refused(
        ollama_api.parse_chat, {"model": "m", "options": {"mirostat": 2}}, Sampling()).message
    assert "option temperature must be 0 or more" in refused(
        ollama_api.parse_chat, {"model": "m", "options": {"temperature": -1}}, Sampling()).message


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("1h30m", 5400.0), ("30s", 30.0), ("500ms", 0.5), (0, 0.0), ("0", 0.0),
    (-1, None), ("-1m", None), (90, 90.0)])
def test_keep_alive_durations(value, seconds):
    assert ollama_api.keep_alive(value) == seconds


def test_keep_alive_nonsense_is_a_400():
    for value in ("soon", True, [], "5 m"):
        refused(ollama_api.keep_alive, value)


def test_ollama_generate_builds_messages_unless_raw():
    request = ollama_api.parse_generate({"model": "m", "prompt": "hi", "system": "Be brief."},
                                        Sampling())
    assert request.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}]
    raw = ollama_api.parse_generate({"model": "m", "prompt": "1 2 3", "raw": True}, Sampling())
    assert raw.messages is None and raw.prompt == "1 2 3"
    assert ollama_api.parse_generate({"model": "m", "keep_alive": 0}, Sampling()).empty
    assert "fill-in-the-middle" in refused(
        ollama_api.parse_generate, {"model": "m", "prompt": "a", "suffix": "b"},
        Sampling()).message
    assert "images" in refused(ollama_api.parse_chat, {"model": "m", "messages": [
        {"role": "user", "content": "?", "images": ["aGk="]}]}, Sampling()).message


def test_ollama_messages_with_tool_calls_and_results():
    request = ollama_api.parse_chat({"model": "m", "tools": [WEATHER], "messages": [
        *HELLO,
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21", "tool_name": "get_weather"}]}, Sampling())
    assert request.messages[1]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": {"city": "Paris"}}
    assert request.messages[2] == {"role": "tool", "content": "21", "name": "get_weather"}
    assert request.tools[0]["function"]["name"] == "get_weather"


def test_ollama_reply_lines():
    piece = ollama_api.part("chat", "m", "Hi")
    assert piece["message"] == {"role": "assistant", "content": "Hi"} and piece["done"] is False
    assert piece["created_at"].endswith("Z")
    last = ollama_api.final(ollama_api.part("generate", "m"), STATS, 1.5, 0.25)
    assert last["response"] == "" and last["done"] and last["done_reason"] == "stop"
    assert (last["total_duration"], last["load_duration"]) == (1_500_000_000, 250_000_000)
    assert (last["prompt_eval_count"], last["eval_count"], last["eval_duration"]) == (
        30, 3, 200_000_000)
    loaded = ollama_api.final(ollama_api.part("chat", "m"), None, 0.1, 0.1, "load")
    assert loaded["done_reason"] == "load" and "eval_count" not in loaded
    assert ollama_api.done_reason("context") == "length"
    text = ollama_api.parameters_text(Sampling(temperature=0.2, stop=("<end>",)))
    assert "temperature          0.2" in text and 'stop                 "<end>"' in text
    assert ollama_api.size_label(134_515_008) == "135M"


# ---- tool calls ------------------------------------------------------------------------------

NAMES = frozenset({"get_weather"})


def test_hermes_calls_are_parsed_and_stray_text_kept():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>')
    content, calls = tools.parse_calls(text, tools.HERMES, NAMES)
    assert content == "Let me look." and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].id.startswith("call_")
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert tools.parse_calls(unknown, tools.HERMES, NAMES) == (unknown, [])
    two = ('<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'
           '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}')
    assert [json.loads(c.arguments)["city"] for c in tools.parse_calls(two, tools.HERMES,
                                                                       NAMES)[1]] == ["A", "B"]


def test_llama3_calls_are_the_whole_answer():
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert tools.parse_calls(text, tools.LLAMA3, NAMES)[1][0].arguments == '{"city": "Oslo"}'
    tagged = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert tools.parse_calls(tagged, tools.LLAMA3, NAMES)[0] == ""
    assert tools.parse_calls("It is sunny.", tools.LLAMA3, NAMES) == ("It is sunny.", [])


def feed_all(flow: tools.CallFilter, pieces: list[str]) -> tuple[str, str, list[tools.ToolCall]]:
    shown = "".join(flow.feed(piece) for piece in pieces)
    rest, calls = flow.finish()
    return shown, rest, calls


def test_the_call_filter_streams_text_and_holds_back_calls():
    pieces = ["Sure", ". <tool", "_call>", '{"name": "get_weather", ', '"arguments": {}}',
              "</tool_call>"]
    shown, rest, calls = feed_all(tools.CallFilter(tools.HERMES, NAMES), pieces)
    assert shown == "Sure. " and rest == "" and calls[0].name == "get_weather"
    shown, rest, calls = feed_all(tools.CallFilter(tools.HERMES, NAMES), ["a <tool", "box>"])
    assert (shown, rest, calls) == ("a <toolbox>", "", [])
    shown, rest, calls = feed_all(tools.CallFilter(tools.LLAMA3, NAMES),
                                  [" {", '"name": "get_weather", "parameters": {}}'])
    assert shown == "" and calls[0].arguments == "{}"
    shown, rest, calls = feed_all(tools.CallFilter(tools.LLAMA3, NAMES), ["The", " sky"])
    assert (shown, rest, calls) == ("The sky", "", [])
    shown, rest, calls = feed_all(tools.CallFilter(tools.LLAMA3, NAMES), ["{not json"])
    assert (shown, rest, calls) == ("", "{not json", [])  # not a call after all: shown at the end


def test_which_templates_take_tools():
    plain = ChatTemplate("embedded", "model file", "{% for m in messages %}{{ m.content }}"
                         "{% endfor %}")
    hermes = ChatTemplate("embedded", "model file", "{% if tools %}{% for t in tools %}"
                          "{{ t | tojson }}{% endfor %}Use <tool_call></tool_call>{% endif %}")
    llama = ChatTemplate("embedded", "model file", "<|start_header_id|>{% if tools %}"
                         "{{ tools | tojson }} parameters{% endif %}")
    odd = ChatTemplate("embedded", "model file", "{% if tools %}[TOOLS]{% endif %}")
    assert not renders_tools(plain) and tools.style_of(plain) is None
    assert "does not render tools" in tools.no_tools_reason(plain)
    assert tools.style_of(hermes) == tools.HERMES and tools.style_of(llama) == tools.LLAMA3
    assert tools.style_of(odd) is None and "cannot parse" in tools.no_tools_reason(odd)


# ---- bounded JSON -------------------------------------------------------------------------------

def test_json_bodies_are_bounded_in_nesting_and_strict():
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nests" in refused(decode_json, deep).message
    assert decode_json(b"[" * MAX_NESTING + b"]" * MAX_NESTING) is not None
    assert "nests" in refused(decode_json, b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1)
                              ).message
    nested_objects = b'{"a":' * (MAX_NESTING + 1) + b"1" + b"}" * (MAX_NESTING + 1)
    assert "nests" in refused(decode_json, nested_objects).message
    assert "not valid JSON" in refused(decode_json, b'{"a": NaN}').message
    assert "empty" in refused(decode_json, b"  ").message
    assert "not valid JSON" in refused(decode_json, b"\xff").message


# ---- serve's flags -----------------------------------------------------------------------------

def test_serve_flags_are_checked_before_anything_loads(tmp_path):
    from cli_runner import run_cli

    models = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for model in models:
        model.write_bytes(b"GGUF")
    result = run_cli("serve", *map(str, models), "--max-loaded", "1")
    assert result.exit_code == 2 and "--max-loaded 1 is fewer than the 2 models" in result.stderr
    for flags, words in ((dict(port=70000), "--port"), (dict(max_loaded=0), "--max-loaded"),
                         (dict(queue_size=-1), "--queue"), (dict(client_timeout=0),
                                                            "--client-timeout")):
        with pytest.raises(Exception) as caught:
            serve_settings("127.0.0.1", flags.pop("port", 8080), None, **flags)
        assert words in str(caught.value)
