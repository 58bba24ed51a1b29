"""`localchat serve` with no MODEL: every model on disk, by name, through Ollama's official
client and OpenAI's; models load on first request, one at a time (--max-loaded 1).

On disk (`serve_process.plant_models`): the catalog's smollm2 and a second model, a copy of
the test model under another name in the Hugging Face cache."""

from __future__ import annotations

import json
import math
import urllib.request

import ollama
import openai
import pytest
from cli_runner import run_cli
from serve_process import COPY_ID, ServeProcess, environment, plant_models

pytestmark = pytest.mark.slow

CATALOG_ID = "smollm2:q4_1"
PROMPT = "Name three primary colours."
GREEDY = {"temperature": 0, "num_predict": 40}
THREADS = ["--threads", "1"]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("ollama-home")
    plant_models(home, smollm2_path)
    serve = ServeProcess(["--port", "0", "--max-loaded", "1", *THREADS],
                         environment(home)).started()
    yield serve
    assert serve.stop() == 130
    assert not any("Traceback" in line for line in serve.log), serve.log


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base, timeout=120)


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def test_every_model_on_disk_is_listed_by_both_apis(client, openai_client):
    listed = {model.model: model for model in client.list().models}
    assert set(listed) == {CATALOG_ID, COPY_ID}
    details = listed[CATALOG_ID].details
    assert (details.format, details.family, details.parameter_size,
            details.quantization_level) == ("gguf", "llama", "135M", "Q4_1")
    assert listed[CATALOG_ID].size == 98_362_432
    assert {model.id for model in openai_client.models.list().data} == {CATALOG_ID, COPY_ID}


def test_the_same_greedy_text_through_run_the_openai_api_and_ollamas(client, openai_client,
                                                                     smollm2_path):
    messages = [{"role": "user", "content": PROMPT}]
    result = run_cli("run", str(smollm2_path), PROMPT, "--temperature", "0", "--max-tokens", "40",
                     *THREADS)
    assert result.exit_code == 0, result.stderr
    ollama_text = client.chat(model="smollm2", messages=messages, options=GREEDY).message.content
    openai_text = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=40).choices[0].message.content
    assert ollama_text + "\n" == openai_text + "\n" == result.stdout


def test_streamed_chat_and_generate(client):
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat(model="smollm2:latest", messages=messages, options=GREEDY)
    parts = list(client.chat(model="smollm2", messages=messages, options=GREEDY, stream=True))
    assert "".join(part.message.content for part in parts) == whole.message.content
    assert [part.done for part in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].eval_count == whole.eval_count > 0
    assert parts[-1].prompt_eval_count > 5 and parts[-1].total_duration > 0
    assert parts[-1].done_reason in ("stop", "length") and whole.model == "smollm2:latest"
    generated = client.generate(model="smollm2", prompt=PROMPT, options=GREEDY)
    assert generated.response == whole.message.content  # the prompt as the user's message
    raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 4})
    assert "Paris" in raw.response


def test_show_ps_and_switching_models(client, server):
    shown = client.show("smollm2")
    assert "<|im_start|>" in shown.template and shown.capabilities == ["completion"]
    assert "temperature          0.2" in shown.parameters  # the catalog's default
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 4096
    client.generate(model="smollm2", prompt="hi", options={"num_predict": 1})
    assert [model.model for model in client.ps().models] == [CATALOG_ID]
    mark = len(server.drain())
    reply = client.chat(model=COPY_ID, messages=[{"role": "user", "content": PROMPT}],
                        options=GREEDY)
    assert reply.load_duration > 0  # this request loaded it
    loaded = client.ps().models
    assert [model.model for model in loaded] == [COPY_ID] and loaded[0].context_length == 4096
    server.wait_for(f"unloaded {CATALOG_ID} (to make room (--max-loaded 1))", after=mark)
    # keep_alive 0 with no prompt: Ollama's way to unload a model now
    assert client.generate(model=COPY_ID, keep_alive=0).done_reason == "unload"
    assert client.ps().models == []
    assert client.generate(model="smollm2", keep_alive="5m").done_reason == "load"
    expires = client.ps().models[0].expires_at
    assert expires is not None and expires.year < 2300  # five minutes, not for ever


def test_num_ctx_reloads_with_that_window(client):
    client.chat(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                options={"num_ctx": 1024, "num_predict": 1})
    assert client.ps().models[0].context_length == 1024
    client.chat(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                options={"num_predict": 1})
    assert client.ps().models[0].context_length == 4096


def test_errors_come_in_ollamas_shape(client, server):
    cases = [
        (lambda: client.chat(model="qwen2.5", messages=[]), 404, "not on this machine"),
        (lambda: client.chat(model="nonesuch", messages=[]), 404, "not found"),
        (lambda: client.chat(model="/etc/passwd.gguf", messages=[]), 404, "is a path"),
        (lambda: client.pull("smollm2"), 501, "localchat pull"),
        (lambda: client.delete("smollm2"), 501, "localchat rm"),
        (lambda: client.chat(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                             options={"mirostat": 2}), 400, "mirostat"),
        (lambda: client.chat(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                             think=True), 400, "does not support thinking"),
        (lambda: client.chat(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                             options={"temperature": -1}), 400, "temperature must be 0 or more"),
    ]
    for call, status, words in cases:
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == status and words in caught.value.error, (
            caught.value.error)
    with urllib.request.urlopen(server.base + "/") as answer:  # what Ollama's clients probe
        assert answer.read() == b"Ollama is running"
    with urllib.request.urlopen(server.base + "/api/version") as answer:
        assert json.load(answer)["version"]


def test_logprobs_and_logit_bias_through_the_openai_api(openai_client, smollm2_path):
    messages = [{"role": "user", "content": PROMPT}]
    reply = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=8, logprobs=True,
        top_logprobs=3)
    tokens = reply.choices[0].logprobs.content
    assert "".join(token.token for token in tokens) == reply.choices[0].message.content
    for token in tokens:  # greedy: the chosen token is the likeliest
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert token.logprob <= 0 and sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    first = vocab.tokenize(bytes(tokens[0].bytes), add_bos=False, special=False)
    assert len(first) == 1
    banned = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=8, logprobs=True,
        logit_bias={str(first[0]): -100}).choices[0].logprobs.content
    assert banned[0].token != tokens[0].token  # the likeliest first token, banned
    assert banned[0].token == tokens[0].top_logprobs[1].token  # so the runner-up comes
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="smollm2", messages=messages, max_tokens=1,
                                              logit_bias={"999999": 1})
    assert "vocabulary" in caught.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.chat.completions.create(model="qwen2.5", messages=messages, max_tokens=1)
    assert missing.value.code == "model_not_found" and "qwen2.5" in missing.value.message


COLOURS = {"type": "object", "properties": {
    "colours": {"type": "array", "items": {"enum": ["red", "yellow", "blue", "green"]},
                "minItems": 3, "maxItems": 3}}, "required": ["colours"]}


def valid(text: str) -> dict:
    import jsonschema

    value = json.loads(text)
    jsonschema.validate(value, COLOURS)
    return value


def test_structured_output_through_both_clients(client, openai_client):
    messages = [{"role": "user", "content": "The three primary colours, as JSON."}]
    ollama_reply = client.chat(model="smollm2", messages=messages, format=COLOURS,
                               options={"temperature": 0, "num_predict": 60})
    assert ollama_reply.done_reason == "stop" and valid(ollama_reply.message.content)
    streamed = "".join(part.message.content for part in client.chat(
        model="smollm2", messages=messages, format=COLOURS, stream=True,
        options={"temperature": 0, "num_predict": 60}))
    assert streamed == ollama_reply.message.content
    generated = client.generate(model="smollm2", prompt="The three primary colours, as JSON.",
                                format=COLOURS, options={"num_predict": 60, "temperature": 0})
    assert valid(generated.response) == valid(ollama_reply.message.content)
    anything = client.generate(model="smollm2", prompt="A colour, as JSON.", format="json",
                               options={"num_predict": 60, "temperature": 0})
    assert anything.done_reason != "stop" or isinstance(json.loads(anything.response), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "colours", "schema": COLOURS}}
    reply = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=60, response_format=schema)
    assert reply.choices[0].finish_reason == "stop" and valid(reply.choices[0].message.content)
    chunks = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=60, stream=True,
        response_format=schema)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        reply.choices[0].message.content
    anything = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=60,
        response_format={"type": "json_object"}).choices[0]
    assert anything.finish_reason != "stop" or isinstance(json.loads(anything.message.content),
                                                          dict)
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=5, response_format={
                "type": "json_schema", "json_schema": {"name": "n", "schema": {
                    "type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}}})
    assert caught.value.param == "response_format" and "'minimum'" in caught.value.message
