"""Structured output: the concise syntax, JSON Schema checks and conversion, GBNF files, and
(with the real model) replies that parse and validate, over many prompts and schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest
from cli_runner import run_cli

from localchat.engine import grammar
from localchat.engine.grammar import (
    OutputGrammar,
    ReplyMismatch,
    check_supported,
    concise_schema,
    from_schema,
    gbnf_grammar,
    json_grammar,
    parse_reply,
    schema_grammar,
)
from localchat.errors import UsageError

# ---- the concise syntax ------------------------------------------------------------------------


def test_concise_fields_default_to_strings_and_take_types_and_descriptions():
    schema = concise_schema("name, age int, tags list, bio: a short bio, score float, ok bool")
    assert schema["required"] == ["name", "age", "tags", "bio", "score", "ok"]
    assert schema["additionalProperties"] is False
    assert schema["properties"] == {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "bio": {"type": "string", "description": "a short bio"},
        "score": {"type": "number"}, "ok": {"type": "boolean"}}
    jsonschema.Draft202012Validator.check_schema(schema)


def test_concise_fields_split_on_newlines_when_there_are_any_so_descriptions_may_have_commas():
    schema = concise_schema("name: first, then last\nage int: in years, rounded down\n")
    assert schema["properties"]["name"]["description"] == "first, then last"
    assert schema["properties"]["age"] == {"type": "integer",
                                           "description": "in years, rounded down"}


@pytest.mark.parametrize(("text", "message"), [
    ("name, born date", "unknown type 'date' for the field 'born'"),
    ("name, name int", "the field 'name' is given twice"),
    (" , ", "--schema is empty"),
])
def test_bad_concise_schemas_are_usage_errors_naming_the_field(text, message):
    with pytest.raises(UsageError, match=message):
        concise_schema(text)


# ---- JSON Schema: valid, and every keyword enforced ----------------------------------------------


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"const": 3}},
     "required": ["kind"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]},
    {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "maybe"},
    {"type": ["string", "integer"]},
    {"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"},
    {"type": "string", "format": "date"},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}},
     "$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"},
                                                         "child": {"$ref": "#/$defs/node"}}}}},
    {},
])
def test_supported_schemas_convert(schema):
    result = from_schema(schema, "--schema")
    assert result.kind == "schema" and "root ::=" in result.gbnf


@pytest.mark.parametrize(("schema", "keyword", "where"), [
    ({"type": "integer", "minimum": 0}, "'minimum'", ""),
    ({"type": "object", "properties": {"age": {"type": "integer", "maximum": 120}}},
     "'maximum'", "/properties/age"),
    ({"type": "string", "format": "email"}, "'format' (\"email\")", ""),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf'", ""),
    ({"allOf": [{"type": "object"}]}, "'allOf'", ""),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "'patternProperties'",
     ""),
    ({"type": "array", "minItems": 2}, "'minItems'", ""),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'", ""),
    ({"type": ["string", "null"], "maxLength": 3}, "'maxLength'", ""),
    ({"type": "string", "pattern": "^a$", "minLength": 1}, "'minLength'", ""),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1},
     "'minProperties'", ""),
    ({"type": "string", "not": {"const": "x"}}, "'not'", ""),
    ({"if": {"type": "string"}, "then": {"type": "string"}, "type": "string"}, "'if'", ""),
])
def test_a_keyword_the_converter_would_drop_is_named_never_ignored(schema, keyword, where):
    with pytest.raises(UsageError) as caught:
        from_schema(schema, "--schema")
    message = caught.value.message
    assert keyword in message and "cannot be enforced" in message
    assert message.endswith(f" at {where}") if where else " at " not in message


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "strin"}, "not a valid JSON Schema: 'strin' is not valid"),
    ({"type": "object", "properties": {"a": {"type": 3}}}, "not a valid JSON Schema"),
    ({"type": "object", "required": ["b"], "properties": {"a": {"type": "string"}}},
     "required names 'b', which is not in properties"),
    ({"type": "object", "properties": {"a": {"description": "no type"}}},
     "a schema with no type at /properties/a"),
    ({"type": "string", "pattern": "[a-z]+"}, r"must start with \^ and end with \$"),
    ({"$ref": "https://example.com/schema.json"}, "is not supported"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "points nowhere"),
    ({"type": "string", "requird": True}, "unknown keyword 'requird'"),
    ({"type": "string", "enum": ["a", 1]}, "a value of enum is not of type 'string'"),
])
def test_invalid_and_unenforceable_schemas_are_one_line_usage_errors(schema, message):
    with pytest.raises(UsageError, match=message) as caught:
        from_schema(schema, "--schema")
    assert "\n" not in str(caught.value)


def test_inline_json_files_and_the_concise_form_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "person.schema.json").write_text(json.dumps(
        {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}))
    assert schema_grammar("person.schema.json").schema["required"] == ["name"]
    assert schema_grammar('{"type": "integer"}').schema == {"type": "integer"}
    assert schema_grammar("name, age int").schema["required"] == ["name", "age"]
    with pytest.raises(UsageError, match="no schema file"):
        schema_grammar("missing.json")
    with pytest.raises(UsageError, match=r"the --schema JSON is not valid JSON: .* column 2"):
        schema_grammar("{oops}")
    (tmp_path / "broken.json").write_text("{\n  \"type\": \n}")
    with pytest.raises(UsageError, match=r"broken.json is not valid JSON: .*line 3"):
        schema_grammar("broken.json")


def test_strings_in_the_grammar_exclude_control_characters_as_json_requires():
    # llama-cpp-python's `char` rule lets a raw newline into a string; json.loads refuses that.
    gbnf = json_grammar().gbnf
    char = next(line for line in gbnf.splitlines() if line.startswith("char ::= "))
    assert char.startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F] | ')
    dot = from_schema({"type": "string", "pattern": "^a.b$"}, "s").gbnf
    assert 'dot ::= [^"\\\\\\x7F\\x00-\\x1F]' in dot.splitlines()


def test_every_converter_branch_the_checker_allows_is_one_the_converter_takes():
    # The checker mirrors SchemaConverter.visit; if llama-cpp-python changes it, this notices.
    import inspect

    from llama_cpp.llama_grammar import SchemaConverter
    source = inspect.getsource(SchemaConverter.visit)
    for keyword in ('"$ref"', '"oneOf"', '"anyOf"', '"const"', '"enum"', '"properties"',
                    '"additionalProperties"', '"allOf"', '"items"', '"prefixItems"', '"pattern"',
                    '"minLength"', '"maxLength"', '"minItems"', '"maxItems"'):
        assert keyword in source, keyword
    assert "minimum" not in source.split("TODO")[0]  # still not enforced


def test_a_reply_is_parsed_and_checked_against_the_schema():
    person = from_schema(concise_schema("name, age int"), "--schema")
    assert parse_reply(person, '{"name": "Ada", "age": 36}', "stop") == {"name": "Ada", "age": 36}
    with pytest.raises(ReplyMismatch, match="cut at the --max-tokens limit"):
        parse_reply(person, '{"name": "Ada", "ag', "length")
    with pytest.raises(ReplyMismatch, match="does not match the schema: 'age' is a required"):
        parse_reply(person, '{"name": "Ada"}', "stop")


def test_gbnf_files_are_read_as_utf8_text(tmp_path):
    good = tmp_path / "yesno.gbnf"
    good.write_text('root ::= "yes" | "no"\n')
    assert gbnf_grammar(str(good)) == OutputGrammar("gbnf", 'root ::= "yes" | "no"\n', str(good))
    for path, message in [(tmp_path / "missing.gbnf", "no grammar file"),
                          (tmp_path, "is a directory")]:
        with pytest.raises(UsageError, match=message):
            gbnf_grammar(str(path))
    (tmp_path / "empty.gbnf").write_text("  \n")
    with pytest.raises(UsageError, match="is empty"):
        gbnf_grammar(str(tmp_path / "empty.gbnf"))
    (tmp_path / "latin1.gbnf").write_bytes(b'root ::= "caf\xe9"')
    with pytest.raises(UsageError, match="not UTF-8"):
        gbnf_grammar(str(tmp_path / "latin1.gbnf"))


def test_check_supported_reports_the_label():
    with pytest.raises(UsageError, match=r"^person.json: the keyword 'minimum'"):
        check_supported({"type": "integer", "minimum": 1}, "person.json")


# ---- the command line, before a model loads ------------------------------------------------------


def test_schema_errors_stop_run_before_the_model_loads(tmp_path):
    model = tmp_path / "never-loaded.gguf"
    model.write_bytes(b"not a model")  # loading it would fail: the schema error must come first
    for argv, message in [
        (["--schema", '{"type": "integer", "minimum": 0}'], "the keyword 'minimum' (0)"),
        (["--schema", "name, born date"], "unknown type 'date'"),
        (["--schema", "{not json"], "is not valid JSON"),
        (["--format", "yaml"], "--format takes json"),
        (["--schema", "name", "--format", "json"], "--schema and --format cannot be used"),
        (["--grammar", str(tmp_path / "nope.gbnf")], "no grammar file"),
        (["--format", "json", "--ignore-eos"], "--ignore-eos cannot be used with a grammar"),
    ]:
        result = run_cli("run", str(model), "hi", *argv)
        assert result.exit_code == 2, (argv, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- with the real model -------------------------------------------------------------------------

SCHEMAS = [
    concise_schema("name, age int, city"),
    concise_schema("title, tags list, done bool"),
    {"type": "object", "properties": {
        "animal": {"enum": ["cat", "dog", "bird"]}, "legs": {"type": "integer"},
        "colours": {"type": "array", "items": {"type": "string", "maxLength": 12},
                    "maxItems": 3}},
     "required": ["animal", "legs", "colours"]},
    {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
        "founded": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
     "required": ["city", "country", "founded", "code"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]},
     "minItems": 2, "maxItems": 3},
]
PROMPTS = ["Invent a person.", "Describe a pet.", "Tell me about Paris.",
           "Give me some data as JSON."]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from localchat.engine.loader import load_engine
    from localchat.engine.options import EngineOptions

    loaded = load_engine(EngineOptions(model_path=smollm2_path, n_ctx=1024, threads=1))
    yield loaded
    loaded.close()


@pytest.mark.slow
@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: "-".join(
    s.get("properties", {"array": 0})))
def test_replies_parse_and_validate_over_many_prompts(engine, schema):
    from localchat.engine.protocol import Sampling

    constrained = from_schema(schema, "test schema")
    finished = 0
    for index, prompt in enumerate(PROMPTS):
        # greedy for the first prompt, seeded sampling for the rest: many different replies
        sampling = Sampling(temperature=0.0 if index == 0 else 0.8, seed=index,
                            max_tokens=200, grammar=constrained)
        messages = [{"role": "user", "content": f"{prompt}\n\n{constrained.instruction()}"}]
        text = "".join(engine.stream(messages, sampling))
        reason = engine.last_stats.finish_reason
        if reason == "length":  # a tiny model may ramble inside a string: cut, and said so
            with pytest.raises(ReplyMismatch, match="cut at the --max-tokens limit"):
                parse_reply(constrained, text, reason)
            continue
        assert reason == "stop", (prompt, text)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert parse_reply(constrained, text, "stop") == value
        finished += 1
    assert finished >= len(PROMPTS) - 1  # the greedy reply and nearly all sampled ones end


@pytest.mark.slow
def test_format_json_gives_an_object_and_json_output_gains_parsed(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Reply with JSON: the capital of France.",
                     "--format", "json",
                     "--temperature", "0", "-n", "100", "--json", "--no-history")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert isinstance(record["parsed"], dict) and record["parsed"] == json.loads(record["text"])


@pytest.mark.slow
def test_schema_text_output_is_the_json_alone(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Invent a person", "--schema", "name, age int",
                     "--temperature", "0", "-n", "100", "--no-history")
    assert result.exit_code == 0, result.stderr
    value = json.loads(result.stdout)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)


@pytest.mark.slow
def test_a_gbnf_grammar_constrains_the_reply(smollm2_path, tmp_path):
    yesno = tmp_path / "yesno.gbnf"
    yesno.write_text('root ::= ("yes" | "no") "."\n')
    result = run_cli("run", str(smollm2_path), "Is the sky blue? Answer yes or no.",
                     "--grammar", str(yesno), "--temperature", "0", "--no-history")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() in ("yes.", "no.")


@pytest.mark.slow
@pytest.mark.parametrize(("text", "reason"), [
    ('root ::= "yes" | maybe\n', "Undefined rule identifier 'maybe'"),
    ('root ::= "yes\n', "unexpected end of input"),
    ('answer ::= "yes"\n', "grammar does not contain a 'root' symbol"),
    ('root ::= [a-\n', "parse"),
])
def test_a_gbnf_syntax_error_is_one_line_from_llama_cpps_parser(smollm2_path, tmp_path, text,
                                                                reason):
    bad = tmp_path / "bad.gbnf"
    bad.write_text(text)
    result = run_cli("run", str(smollm2_path), "hi", "--grammar", str(bad), "--no-history")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the grammar {bad} does not parse: ")
    assert reason in lines[0] or reason == "parse"
    assert result.stdout == ""


@pytest.mark.slow
def test_a_reply_cut_by_max_tokens_is_an_error_and_json_shows_parsed_null(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Write a long story", "--schema",
                     "story: a long story", "--temperature", "0", "-n", "5", "--json",
                     "--no-history")
    assert result.exit_code == 1
    record = json.loads(result.stdout)
    assert record["parsed"] is None and record["finish_reason"] == "length"
    assert "not complete JSON: it was cut at the --max-tokens limit" in result.stderr


def test_grammar_module_keeps_llama_cpp_out_of_the_import():
    # the CLI imports the module to check flags; llama_cpp is imported only to convert
    assert "llama_cpp" not in grammar.__dict__


@pytest.mark.slow
@pytest.mark.parametrize("schema", SCHEMAS[:3], ids=["person", "todo", "pet"])
def test_checking_the_pick_first_gives_what_the_grammar_in_the_chain_gives(engine, schema,
                                                                          monkeypatch):
    # llama.cpp's common_sampler order (the chain picks, the grammar checks that pick) is only a
    # shortcut: greedy decoding must give exactly what masking every token first gives.
    from llama_cpp import _internals

    from localchat.engine.grammar_sampler import GrammarSampler, init_grammar
    from localchat.engine.local import LocalEngine
    from localchat.engine.protocol import Sampling

    constrained = from_schema(schema, "test schema")
    sampling = Sampling(temperature=0.0, max_tokens=120, grammar=constrained)
    messages = [{"role": "user", "content": f"Describe something.\n\n{constrained.instruction()}"}]
    built: list[GrammarSampler] = []
    original = LocalEngine._sampler

    def remembered(self: LocalEngine, given: Sampling, *options: object) -> object:
        sampler = original(self, given, *options)
        built.append(sampler)
        return sampler

    monkeypatch.setattr(LocalEngine, "_sampler", remembered)
    engine.reset_cache()  # both from scratch: a reused cache gives logits a rounding apart
    shortcut = "".join(engine.stream(messages, sampling))
    assert built[0].rejections > 0  # the grammar did refuse picks (the "{" to start with)

    def in_the_chain(self: LocalEngine, given: Sampling, *options: object) -> object:
        chain = _internals.LlamaSampler()
        self._llama_cpp.llama_sampler_chain_add(
            chain.sampler, init_grammar(self._llama_cpp, self._vocab, given.grammar))
        chain.add_greedy()
        return chain

    monkeypatch.setattr(LocalEngine, "_sampler", in_the_chain)
    engine.reset_cache()
    assert "".join(engine.stream(messages, sampling)) == shortcut
    json.loads(shortcut)


@pytest.mark.slow
def test_a_grammar_turns_a_thinking_models_thinking_off_or_is_refused(thinking_models):
    # the grammar shapes every sampled token: thinking would be forced into JSON
    result = run_cli("run", str(thinking_models["qwen3"]), "Invent a person", "--schema",
                     "name, age int", "--temperature", "0", "-n", "60", "--json", "--no-history")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert set(record["parsed"]) == {"name", "age"} and not record.get("reasoning")
    result = run_cli("run", str(thinking_models["r1"]), "Invent a person", "--schema",
                     "name, age int", "--no-history")
    assert result.exit_code == 2
    assert "cannot switch that off, so a grammar would shape its thinking" in result.stderr
