"""Constrained output: a JSON Schema, the concise field list, `--format json` or a GBNF file,
turned into the llama.cpp grammar the sampler chain enforces token by token.

The JSON Schema conversion is llama-cpp-python's own (`llama_grammar.json_schema_to_gbnf`, a port
of llama.cpp's converter). It enforces only part of JSON Schema and ignores the rest without a
word, so `check_supported` walks a schema the way the converter does and names every keyword
the converter would drop: a reply that the grammar allowed then always validates. No I/O but
reading the files named; the grammar's syntax is checked by llama.cpp itself when the sampler is
built (`engine.local`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from localchat.errors import LocalchatError, UsageError

MAX_GRAMMAR_FILE_BYTES = 1_000_000  # a real grammar is a few KB; more is the wrong file

# Keywords that only annotate: nothing to enforce.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs",
    "definitions", "deprecated", "readOnly", "writeOnly", "contentMediaType",
    "contentEncoding", "$anchor",
})
# Every keyword of JSON Schema that constrains (drafts 4 to 2020-12), to tell "not enforced"
# from "not a keyword at all" in the error.
CONSTRAINTS = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "items", "prefixItems",
    "additionalItems", "contains", "maxContains", "minContains", "maxItems", "minItems",
    "uniqueItems", "properties", "patternProperties", "additionalProperties", "propertyNames",
    "required", "dependentRequired", "dependentSchemas", "dependencies", "maxProperties",
    "minProperties", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "unevaluatedItems",
    "unevaluatedProperties", "$ref", "$dynamicRef", "$recursiveRef", "$dynamicAnchor",
    "$recursiveAnchor", "$vocabulary",
})
_SIMPLE_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
_HINTS = {
    "oneOf": "use anyOf: the grammar enforces one of the alternatives, not exactly one",
    "allOf": "merge the parts into one schema",
    "minimum": "ranges of numbers cannot be enforced; use enum for a few values, or check after",
    "maximum": "ranges of numbers cannot be enforced; use enum for a few values, or check after",
    "format": f"the grammar knows the formats {', '.join(_FORMATS[:4])}; use a pattern instead",
}

# The converter lets raw control characters into strings (its `char` rule is [^"\\]), which a
# JSON parser refuses; llama.cpp's own C++ converter excludes them, and so do we.
_CHAR_RULE_OLD = 'char ::= [^"\\\\] | '
_CHAR_RULE_NEW = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] | '
_DOT_RULE_OLD = "dot ::= [^\\x0A\\x0D]"
_DOT_RULE_NEW = 'dot ::= [^"\\\\\\x7F\\x00-\\x1F]'

Kind = Literal["schema", "json", "gbnf"]


@dataclass(frozen=True)
class OutputGrammar:
    """A constraint on the reply: the GBNF text, and what to check the finished reply against."""

    kind: Kind  # schema: JSON valid against `schema`; json: any JSON object; gbnf: the grammar's
    gbnf: str
    label: str  # what the user gave, for messages and the history ("name, age int", a path)
    schema: Mapping[str, Any] | None = field(default=None, compare=False)
    # Lazy: free text until one of these regular expressions matches the reply so far (from its
    # start); the grammar then holds from the pattern's first group on (a tool call's opening).
    triggers: tuple[str, ...] = ()

    @property
    def is_json(self) -> bool:
        """The reply is JSON (to parse, and to show as `parsed`)."""
        return self.kind in ("schema", "json")

    def instruction(self) -> str | None:
        """A line for the prompt: the model writes better values when it sees the schema."""
        if self.kind != "schema":
            return None
        return ("Reply with only a JSON object that follows this JSON Schema: "
                + json.dumps(self.schema, ensure_ascii=False, separators=(",", ":")))


class ReplyMismatch(LocalchatError):
    """A finished reply that is not what the grammar promised (cut short by a limit)."""


# ---- the concise syntax: "name, age int, tags list, bio: a short bio" ---

_CONCISE_TYPES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"}, "string": {"type": "string"},
    "int": {"type": "integer"}, "integer": {"type": "integer"},
    "float": {"type": "number"}, "number": {"type": "number"},
    "bool": {"type": "boolean"}, "boolean": {"type": "boolean"},
    "list": {"type": "array", "items": {"type": "string"}},
}
_FIELD = re.compile(r"^\s*([^\s:]+)(?:\s+([^\s:]+))?\s*(?::\s*(.*?))?\s*$", re.DOTALL)


def concise_schema(text: str) -> dict[str, Any]:
    """A JSON Schema from `llm`'s concise syntax: fields split on commas (on newlines when there
    are any), each `NAME [TYPE][: description]`; the type defaults to str; all are required."""
    lines = text.splitlines() if "\n" in text.strip() else text.split(",")
    properties: dict[str, Any] = {}
    for raw in lines:
        if not raw.strip():
            continue
        match = _FIELD.match(raw)
        if match is None:
            raise UsageError(f"--schema: cannot read the field {raw.strip()!r}",
                             "write NAME [TYPE][: description], e.g. 'age int: in years'")
        name, kind, description = match.group(1), match.group(2) or "str", match.group(3)
        if kind.lower() not in _CONCISE_TYPES:
            raise UsageError(f"--schema: unknown type {kind!r} for the field {name!r}",
                             f"types: {', '.join(['str', 'int', 'float', 'bool', 'list'])}")
        if name in properties:
            raise UsageError(f"--schema: the field {name!r} is given twice")
        properties[name] = dict(_CONCISE_TYPES[kind.lower()])
        if description:
            properties[name]["description"] = description
    if not properties:
        raise UsageError("--schema is empty", "e.g. --schema 'name, age int, city'")
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


# ---- reading what the user gave ---------------------------------------------------------------

def schema_grammar(argument: str, base: Path | None = None) -> OutputGrammar:
    """`--schema ARG`: inline JSON (starts with `{`), a file (exists, or ends in .json), or the
    concise syntax. Relative paths are read from `base` (a preset's folder) or the current one."""
    stripped = argument.strip()
    if stripped.startswith("{"):
        schema = _parse_json(stripped, "the --schema JSON")
        label = "inline JSON Schema"
    else:
        path = _path(stripped, base)
        if path.is_file() or stripped.lower().endswith(".json"):
            schema = _parse_json(_read_text(path, "schema"), f"the schema file {stripped}")
            label = stripped
        else:
            schema = concise_schema(stripped)
            label = stripped
    return from_schema(schema, label)


def from_schema(schema: Any, label: str) -> OutputGrammar:
    """Check a JSON Schema (valid, and every keyword enforceable) and convert it."""
    if not isinstance(schema, dict):
        raise UsageError(f"{label}: a JSON Schema is a JSON object (got {type(schema).__name__})")
    _check_valid(schema, label)
    check_supported(schema, label)
    return OutputGrammar("schema", to_gbnf(schema, label), label, schema)


def json_grammar() -> OutputGrammar:
    """`--format json`: any JSON object."""
    return OutputGrammar("json", to_gbnf({"type": "object"}, "--format json"), "json")


def gbnf_grammar(argument: str, base: Path | None = None) -> OutputGrammar:
    """`--grammar FILE`: a GBNF grammar (its syntax is checked when the sampler is built)."""
    text = _read_text(_path(argument, base), "grammar")
    if not text.strip():
        raise UsageError(f"the grammar file {argument} is empty")
    return OutputGrammar("gbnf", text, argument)


def output_grammar(schema: str | Mapping[str, Any] | None, output_format: str | None,
                   grammar: str | None, base: Path | None = None,
                   where: str = "") -> OutputGrammar | None:
    """The one constraint a run or a preset names (--schema, --format json or --grammar), or
    None for free text; `where` names a preset's table in messages."""
    given = [name for name, value in (("--schema", schema), ("--format", output_format),
                                      ("--grammar", grammar)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{where}{' and '.join(given)} cannot be used together",
                         "give one of them")
    if isinstance(schema, Mapping):  # a preset's schema written as a TOML table
        return from_schema(dict(schema), f"{where}schema")
    if schema is not None:
        return schema_grammar(schema, base)
    if output_format is not None:
        if output_format.strip().lower() != "json":
            raise UsageError(f"{where}--format takes json (got {output_format!r})",
                             "for a shape, use --schema; for any grammar, --grammar FILE")
        return json_grammar()
    return gbnf_grammar(grammar, base) if grammar is not None else None


def _path(argument: str, base: Path | None) -> Path:
    path = Path(argument).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _read_text(path: Path, what: str) -> str:
    try:
        if path.is_dir():
            raise UsageError(f"the {what} file {path} is a directory")
        size = path.stat().st_size
        if size > MAX_GRAMMAR_FILE_BYTES:
            raise UsageError(f"the {what} file {path} is {size:,} bytes; a {what} is at most "
                             f"{MAX_GRAMMAR_FILE_BYTES:,}")
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"no {what} file {path}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"the {what} file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, "
                         f"column {exc.colno})") from None


def _check_valid(schema: dict[str, Any], label: str) -> None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = _pointer(exc.path)
        raise UsageError(f"{label} is not a valid JSON Schema: {_short(exc.message)}"
                         + (f" at {where}" if where != "/" else "")) from None


# ---- which keywords the converter enforces ----------------------------------------------------

def check_supported(schema: Mapping[str, Any], label: str = "the schema") -> None:
    """Raise UsageError naming the first keyword `json_schema_to_gbnf` would not enforce.

    Mirrors `SchemaConverter.visit`: at each node one branch applies (in its order: $ref, anyOf,
    a list of types, const, enum, object properties, allOf, array items, pattern, format,
    string lengths, any object, a plain type), and that branch reads only some keywords.
    """
    _Walker(schema, label).visit(schema, "")


class _Walker:
    def __init__(self, root: Mapping[str, Any], label: str) -> None:
        self.root, self.label, self.seen_refs = root, label, set[str]()

    def fail(self, message: str, where: str, hint: str | None = None) -> UsageError:
        return UsageError(f"{self.label}: {message}" + (f" at {where}" if where else ""), hint)

    def visit(self, node: Any, where: str) -> None:
        if isinstance(node, bool):
            raise self.fail(f"the schema `{json.dumps(node)}` is not supported", where,
                            "give a schema with a type")
        keys = set(node) - ANNOTATIONS
        used, children = self.branch(node, where)
        for key in sorted(keys - used):
            if key not in CONSTRAINTS:
                raise self.fail(f"unknown keyword {key!r}", where,
                                "JSON Schema has no such keyword; remove it or fix its spelling")
            value = node[key]
            shown = f" ({json.dumps(value)})" if isinstance(value, str | int | float) else ""
            raise self.fail(f"the keyword {key!r}{shown} cannot be enforced", where,
                            _HINTS.get(key, "the grammar cannot enforce it; remove it"))
        for child, child_where in children:
            self.visit(child, child_where)

    def branch(self, node: Mapping[str, Any], where: str) -> tuple[set[str], list[Any]]:
        """The keywords the converter's branch for `node` reads, and the subschemas it visits."""
        kind = node.get("type")
        if "$ref" in node:
            return {"$ref"}, self.follow(node["$ref"], where)
        if "oneOf" in node:
            raise self.fail("the keyword 'oneOf' cannot be enforced", where, _HINTS["oneOf"])
        if "anyOf" in node:
            return {"anyOf"}, [(alt, f"{where}/anyOf/{i}") for i, alt in enumerate(node["anyOf"])]
        if isinstance(kind, list):
            return {"type"}, []
        if "const" in node or "enum" in node:
            values = [node["const"]] if "const" in node else node["enum"]
            if kind is not None and any(not _is_type(value, kind) for value in values):
                raise self.fail(f"a value of {'const' if 'const' in node else 'enum'} is not "
                                f"of type {kind!r}", where)
            return {"const" if "const" in node else "enum", "type"}, []
        if kind in (None, "object") and ("properties" in node or (
                "additionalProperties" in node and node["additionalProperties"] is not True)):
            properties = node.get("properties", {})
            missing = [name for name in node.get("required", []) if name not in properties]
            if missing:
                raise self.fail(f"required names {missing[0]!r}, which is not in properties",
                                where, "the grammar writes only the properties listed")
            children = [(value, f"{where}/properties/{_escape(name)}")
                        for name, value in properties.items()]
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                children.append((extra, f"{where}/additionalProperties"))
            return {"type", "properties", "required", "additionalProperties"}, children
        if kind in (None, "object") and "allOf" in node:
            raise self.fail("the keyword 'allOf' cannot be enforced", where, _HINTS["allOf"])
        if kind in (None, "array") and ("items" in node or "prefixItems" in node):
            return self.array(node, where)
        if kind in (None, "string") and "pattern" in node:
            pattern = node["pattern"]
            if not (pattern.startswith("^") and pattern.endswith("$")):
                raise self.fail(f"the pattern {pattern!r} must start with ^ and end with $", where,
                                "the grammar matches whole strings, so anchor the pattern")
            return {"type", "pattern"}, []
        if kind in (None, "string") and node.get("format") in _FORMATS:
            return {"type", "format"}, []
        if kind == "string" and ("minLength" in node or "maxLength" in node):
            return {"type", "minLength", "maxLength"}, []
        if kind == "object" or not node:  # any JSON object (the converter's reading of {})
            return {"type", "additionalProperties"} if node.get(
                "additionalProperties") is True else {"type"}, []
        if kind is None:
            raise self.fail("a schema with no type", where, 'add a "type"')
        return {"type"}, []

    def array(self, node: Mapping[str, Any], where: str) -> tuple[set[str], list[Any]]:
        items = node.get("items")
        if isinstance(items, list):  # the tuple form of drafts up to 2019-09
            return {"type", "items"}, [(item, f"{where}/items/{i}") for i, item in
                                       enumerate(items)]
        if isinstance(items, dict) and items:
            return {"type", "items", "minItems", "maxItems"}, [(items, f"{where}/items")]
        if "prefixItems" in node:  # the grammar writes exactly these items, so `items` holds
            return {"type", "prefixItems", "items"}, [
                (item, f"{where}/prefixItems/{i}") for i, item in enumerate(node["prefixItems"])]
        raise self.fail(f"items {json.dumps(items)} (items of any type)", where,
                        'give the items a schema with a type, e.g. {"type": "string"}')

    def follow(self, ref: Any, where: str) -> list[Any]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(f"the $ref {ref!r} is not supported", where,
                            "only references inside the schema (#/$defs/...) can be followed")
        if ref in self.seen_refs:
            return []
        self.seen_refs.add(ref)
        target: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.fail(f"the $ref {ref!r} points nowhere", where)
            target = target[part]
        return [(target, ref[1:] or "/")]


def _is_type(value: Any, kind: str) -> bool:
    checks = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "null": lambda v: v is None, "array": lambda v: isinstance(v, list),
              "object": lambda v: isinstance(v, dict),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
              or isinstance(v, float) and v.is_integer(),
              "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool)}
    return checks.get(kind, lambda v: False)(value)


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _pointer(path: Any) -> str:
    return "/" + "/".join(_escape(str(part)) for part in path)


def _short(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# ---- conversion, and checking a finished reply ---------------------------------------------

def to_gbnf(schema: Mapping[str, Any], label: str) -> str:
    """The GBNF of a checked schema, by llama-cpp-python's converter (strings without control
    characters, as JSON requires)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise UsageError(f"{label}: cannot be turned into a grammar: {_short(str(exc))}") from None
    return "\n".join(_CHAR_RULE_NEW + line[len(_CHAR_RULE_OLD):]
                     if line.startswith(_CHAR_RULE_OLD) else
                     _DOT_RULE_NEW if line == _DOT_RULE_OLD else line
                     for line in gbnf.splitlines())


def parse_reply(grammar: OutputGrammar, text: str, finish_reason: str) -> Any:
    """The reply as a JSON value, checked against the schema; ReplyMismatch when it is not."""
    cut = {"length": "it was cut at the --max-tokens limit",
           "context": "it was cut when the context window filled",
           "interrupted": "it was interrupted",
           "stop": "it was cut at a stop string"}.get(finish_reason, finish_reason)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReplyMismatch(f"the reply is not complete JSON: {cut} ({exc.msg})",
                            "raise --max-tokens, or ask for shorter values") from None
    if grammar.schema is not None:
        from jsonschema import Draft202012Validator
        from jsonschema.validators import validator_for

        validator = validator_for(grammar.schema, default=Draft202012Validator)(grammar.schema)
        error = next(iter(validator.iter_errors(value)), None)
        if error is not None:
            raise ReplyMismatch(f"the reply does not match the schema: {_short(error.message)} "
                                f"at {_pointer(error.absolute_path)}")
    return value
