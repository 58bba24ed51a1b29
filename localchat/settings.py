"""Every sampling, load and chat setting, declared once, and the merge of their sources.

A row says what a setting is (type, bounds, built-in default, one line of help) and what it is
called in each front end: its flag (and which commands take it), its `config.toml` key (the
row's name), whether `models.toml` may set it per model, whether `/set` changes it, and its
OpenAI request field and Ollama option. The front ends derive from these rows: the typer flags
(commands/options.py), `config.toml` (config.py), the catalog's defaults (models/catalog.py),
`/set` and `/show` (chat/), the server's request checking (serve/openai_api.py), and the
engine's own last check (`Sampling.validate`, `EngineOptions.validate`).

`check` and `parse` say what is wrong in words with no name in front ("must be in (0, 1] (got 0)");
each front end puts its own name there: `--top-p`, `config.toml, line 3: top_p`, `/set top_p`,
the JSON field `top_p`. Precedence is one function, `merge`: flag > config > catalog > built-in.

Like Ollama's `api.Options` and simonw/llm's `Options`: one declaration, used everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["int", "float", "bool", "str", "list"]
Scope = Literal["sampling", "load", "chat"]
Command = Literal["run", "serve", "bench"]

INT32_MAX = 2**31 - 1  # what llama.cpp's C ints hold
SEED_MAX = 2**32 - 2  # llama.cpp reserves 2**32 - 1 for "a random seed"
# The built-in chat templates (engine/templates.py FORMAT_NAMES; a test keeps the two equal).
# llama.cpp's KV cache types localchat offers (engine/local.py maps them to ggml types).
CACHE_TYPES = ("f16", "q8_0", "q4_0")
DRAFT_MODES = ("auto", "ngram", "off")  # engine/speculative.py: prompt-lookup drafts
CHAT_FORMATS = ("chatml", "llama3", "gemma", "phi3", "mistral", "llama2", "raw")


@dataclass(frozen=True)
class Setting:
    """One setting: what it is, and its name in every front end (None: not settable there)."""

    name: str  # canonical: the config.toml key, the models.toml key and the /set name
    kind: Kind  # "list" is a list of strings
    scope: Scope  # sampling -> Sampling, load -> EngineOptions, chat -> the chat and history
    default: Any  # built-in; None: not set, or worked out at load (`shown_default` says how)
    help: str  # one line, for --help
    flag: str | None = None  # "--top-p"; a switch is "--mmap/--no-mmap" or just "--cpu"
    short: str | None = None  # "-n"
    commands: tuple[Command, ...] = ("run",)  # the commands that take the flag
    low: float | None = None  # bounds, inclusive unless `low_open` / `high_open`
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()  # for text: the values allowed (matched case-insensitively)
    config: bool = True  # a key in config.toml
    catalog: bool = False  # may appear in a models.toml entry's defaults
    slash: bool = False  # settable with /set, shown by /show
    openai: str | None = None  # the request field of `localchat serve`
    openai_alias: str | None = None  # another server's name for the same field (vLLM's)
    ollama: str | None = None  # the Ollama option name (`api/types.go` Options)
    shown_default: str | None = None  # the default in words, where it is not a plain value
    metavar: str | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        """The option names typer declares, e.g. ("--max-tokens", "-n")."""
        assert self.flag is not None
        return (self.flag, self.short) if self.short else (self.flag,)

    @property
    def flag_name(self) -> str:
        """The flag as an error names it: the positive one of a pair."""
        assert self.flag is not None
        return self.flag.split("/")[0]

    @property
    def switch(self) -> bool:
        """A bool flag with no --no- twin: absent and False are the same "not given"."""
        return self.kind == "bool" and "/" not in (self.flag or "")

    @property
    def expects(self) -> str:
        """The values allowed, in words: "a number in (0, 1]", "an integer, 16 or more"."""
        noun = {"int": "an integer", "float": "a number", "bool": "true or false",
                "str": "text", "list": "text or a list of texts"}[self.kind]
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        bounds = self.bounds
        if not bounds:
            return noun
        return f"{noun} {bounds}" if bounds.startswith("in ") else f"{noun}, {bounds}"

    @property
    def bounds(self) -> str:
        """The range alone, in words; empty when there is none (INT32_MAX goes unsaid)."""
        shown_high = None if self.high == INT32_MAX else self.high
        low, high = _number_text(self.low), _number_text(shown_high)
        if self.low is not None and shown_high is not None:
            return (f"in {'(' if self.low_open else '['}{low}, {high}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"above {low}" if self.low_open else f"{low} or more"
        if shown_high is not None:
            return f"below {high}" if self.high_open else f"{high} or less"
        return ""

    @property
    def default_text(self) -> str:
        """The built-in default as the help shows it."""
        if self.shown_default is not None:
            return self.shown_default
        return format_value(self, self.default)


_LOAD: tuple[Command, ...] = ("run", "serve", "bench")
_SERVED: tuple[Command, ...] = ("run", "serve")

SETTINGS: tuple[Setting, ...] = (
    # ---- sampling: each reply; `localchat serve` takes them per request -----------------------
    Setting("temperature", "float", "sampling", 0.8, "Randomness; 0 is greedy and deterministic.",
            flag="--temperature", low=0, catalog=True, slash=True, openai="temperature",
            ollama="temperature"),
    Setting("top_p", "float", "sampling", 0.95,
            "Sample from the likeliest tokens that make up this much probability.",
            flag="--top-p", low=0, high=1, low_open=True, catalog=True, slash=True,
            openai="top_p", ollama="top_p"),
    Setting("top_k", "int", "sampling", 40, "Sample from the K likeliest tokens; 0 is off.",
            flag="--top-k", low=0, high=INT32_MAX, catalog=True, slash=True, openai="top_k",
            ollama="top_k", metavar="K"),
    Setting("min_p", "float", "sampling", 0.05,
            "Drop tokens less likely than this fraction of the likeliest one; 0 is off.",
            flag="--min-p", low=0, high=1, catalog=True, slash=True, openai="min_p",
            ollama="min_p"),
    Setting("repeat_penalty", "float", "sampling", 1.0,
            "Divide the odds of tokens seen in the last 64 by this; 1 is off.",
            flag="--repeat-penalty", low=0, low_open=True, catalog=True, slash=True,
            openai="repeat_penalty", openai_alias="repetition_penalty", ollama="repeat_penalty"),
    Setting("presence_penalty", "float", "sampling", 0.0,
            "Subtract this from the logits of tokens seen in the last 64; 0 is off.",
            flag="--presence-penalty", low=-2, high=2, catalog=True, slash=True,
            openai="presence_penalty", ollama="presence_penalty"),
    Setting("frequency_penalty", "float", "sampling", 0.0,
            "Subtract this times their count from tokens seen in the last 64; 0 is off.",
            flag="--frequency-penalty", low=-2, high=2, catalog=True, slash=True,
            openai="frequency_penalty", ollama="frequency_penalty"),
    Setting("seed", "int", "sampling", None, "Random seed, for reproducible sampling.",
            flag="--seed", low=0, high=SEED_MAX, slash=True, openai="seed", ollama="seed",
            shown_default="random", metavar="N"),
    Setting("max_tokens", "int", "sampling", None,
            "Stop after N tokens, a thinking model's thinking included (finish reason length).",
            flag="--max-tokens", short="-n", low=1, high=INT32_MAX, slash=True,
            openai="max_tokens", openai_alias="max_completion_tokens", ollama="num_predict",
            shown_default="no limit", metavar="N"),
    Setting("stop", "list", "sampling", (),
            "Stop at this text; repeatable; \\n, \\t, \\r and \\\\ are escapes.",
            flag="--stop", slash=True, openai="stop", ollama="stop", shown_default="none"),
    Setting("ignore_eos", "bool", "sampling", False,
            "Keep generating past the end of the turn (for measuring).",
            flag="--ignore-eos", config=False, openai="ignore_eos"),
    Setting("think", "bool", "sampling", None,
            "Let a thinking model think: its chat template's own switch (Qwen3's "
            "enable_thinking).", flag="--think/--no-think", commands=_SERVED, catalog=True,
            slash=True, shown_default="the model's own"),
    Setting("think_budget", "int", "sampling", None,
            "End a thinking model's thinking after N tokens, then it answers; 0 answers at once.",
            flag="--think-budget", low=0, high=INT32_MAX, commands=_SERVED, catalog=True,
            slash=True, openai="think_budget", shown_default="no limit", metavar="N"),
    Setting("draft", "str", "sampling", "auto",
            "Speculative drafts from the context (prompt lookup; adapts, and pauses where it "
            "does not pay): auto keeps drafts only in batch shapes it measured to match "
            "tokens evaluated alone, so the text is exactly that of off; ngram drafts anyway; "
            "off.",
            flag="--draft", commands=_LOAD, choices=DRAFT_MODES, catalog=True, slash=True,
            metavar="MODE"),
    # ---- load: how the model is opened ----------------------------------------------------------
    Setting("ctx", "int", "load", None, "Context window in tokens.", flag="--ctx", low=16,
            high=2**24, commands=_LOAD, catalog=True, ollama="num_ctx",
            shown_default="the model's trained length, at most 4096", metavar="N"),
    Setting("threads", "int", "load", None, "CPU threads.", flag="--threads", low=1,
            high=INT32_MAX, commands=_LOAD, ollama="num_thread", shown_default="physical cores",
            metavar="N"),
    Setting("gpu_layers", "int", "load", None, "Layers to offload to the GPU.",
            flag="--gpu-layers", low=0, high=INT32_MAX, commands=_SERVED, ollama="num_gpu",
            shown_default="all, with a GPU build", metavar="N"),
    Setting("cpu", "bool", "load", False, "Run on the CPU even with a GPU build.", flag="--cpu",
            commands=_SERVED),
    Setting("mmap", "bool", "load", True,
            "Map the weights from the file (off: read them into memory).",
            flag="--mmap/--no-mmap", commands=_SERVED, ollama="use_mmap"),
    Setting("mlock", "bool", "load", False, "Lock the weights in RAM.", flag="--mlock/--no-mlock",
            commands=_SERVED, ollama="use_mlock"),
    Setting("flash_attn", "bool", "load", True, "llama.cpp's flash attention.",
            flag="--flash-attn/--no-flash-attn", commands=_LOAD),
    Setting("cache_type", "str", "load", "f16",
            "KV cache type: f16, q8_0 (about half the memory) or q4_0; a quantized cache needs "
            "flash attention.", flag="--cache-type", commands=_LOAD, choices=CACHE_TYPES,
            catalog=True, metavar="TYPE"),
    Setting("chat_format", "str", "load", None,
            f"Use a built-in chat template: {', '.join(CHAT_FORMATS[:-1])}, or raw (none).",
            flag="--chat-format", commands=_SERVED, choices=CHAT_FORMATS,
            shown_default="the model file's", metavar="NAME"),
    # ---- chat: the conversation and how it is shown and kept -----------------------------------
    Setting("system", "str", "chat", None, "System prompt.", flag="--system", slash=True,
            metavar="TEXT"),
    Setting("markdown", "bool", "chat", True, "Render the chat's replies as markdown.",
            flag="--markdown/--no-markdown", slash=True),
    Setting("history", "bool", "chat", True, "Save conversations to the history database.",
            flag="--history/--no-history"),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}
# Other names /set understands (the canonical one is always shown).
SLASH_ALIASES = {"temp": "temperature", "repetition_penalty": "repeat_penalty"}


def get(name: str) -> Setting:
    """The row called `name` (KeyError for an unknown one: a programming error)."""
    return _BY_NAME[name]


def find(name: str) -> Setting | None:
    """The row called `name`, or None."""
    return _BY_NAME.get(name)


def in_scope(scope: Scope) -> tuple[Setting, ...]:
    """The rows of one scope, in table order."""
    return tuple(setting for setting in SETTINGS if setting.scope == scope)


def for_command(command: Command) -> tuple[Setting, ...]:
    """The rows whose flag `command` takes."""
    return tuple(s for s in SETTINGS if s.flag is not None and command in s.commands)


class Invalid(ValueError):
    """A value a setting does not take; the message has no name in front, the caller adds it."""


def checked(setting: Setting, value: Any) -> Any:
    """`value` as the setting holds it (an int for a number becomes a float, a list a tuple).

    None is allowed where the built-in default is None ("not set"). Raises `Invalid` with
    "must be ... (got ...)".
    """
    if value is None and setting.default is None:
        return None
    kind = setting.kind
    ok_type = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool)
        and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list | tuple) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok_type:
        raise Invalid(f"must be {setting.expects} (got {shown(value)})")
    if kind in ("int", "float") and not _in_bounds(setting, value):
        bounds = f"{INT32_MAX} or less" if value > INT32_MAX else setting.bounds
        raise Invalid(f"must be {bounds} (got {shown(value)})")
    if kind == "list":
        return tuple(value)
    if setting.choices:
        if value.strip().lower() not in setting.choices:
            raise Invalid(f"must be {setting.expects} (got {shown(value)})")
        return value.strip().lower()
    return float(value) if kind == "float" else value


def check(setting: Setting, value: Any) -> str | None:
    """What is wrong with `value` for `setting` ("must be ..."), or None when it is fine."""
    try:
        checked(setting, value)
    except Invalid as problem:
        return str(problem)
    return None


_SWITCHES = {"on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}


def parse(setting: Setting, text: str) -> Any:
    """A value typed as text (`/set NAME TEXT`), typed and checked; raises `Invalid`.

    "none" clears a setting whose default is None; text settings take the text as it is, and a
    stop string interprets the escapes \\n, \\t, \\r and \\\\ (empty text clears the list).
    """
    stripped = text.strip()
    if setting.kind == "str" and not setting.choices:
        return checked(setting, stripped)
    if setting.kind == "list":
        return checked(setting, (unescape(stripped),) if stripped else ())
    if setting.default is None and stripped.lower() == "none":
        return None
    value: Any = stripped
    try:
        if setting.kind == "int":
            value = int(stripped)
        elif setting.kind == "float":
            value = float(stripped)
        elif setting.kind == "bool":
            value = _SWITCHES[stripped.lower()]
    except (ValueError, KeyError):
        expected = "on or off" if setting.kind == "bool" else setting.expects
        none = ", or none" if setting.default is None else ""
        raise Invalid(f"must be {expected}{none} (got {shown(stripped)})") from None
    return checked(setting, value)


def merge(flags: Mapping[str, Any], config: Mapping[str, Any],
          catalog: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting's value: the flag, else config.toml, else the model's catalog default, else
    the built-in default. Each source holds only what it sets, already checked by its front end.
    """
    unknown = (set(flags) | set(config) | set(catalog)) - set(_BY_NAME)
    if unknown:
        raise TypeError(f"not settings: {sorted(unknown)}")
    return {setting.name: next((source[setting.name] for source in (flags, config, catalog)
                                if source.get(setting.name) is not None), setting.default)
            for setting in SETTINGS}


def values_of(scope: Scope, values: Mapping[str, Any]) -> dict[str, Any]:
    """The merged values of one scope, by name (Sampling's fields are the sampling rows)."""
    return {setting.name: values[setting.name] for setting in in_scope(scope)}


# ---- text: escapes in stop strings, and values as the help and /show print them --------------

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` as the characters they name, as llama.cpp's tools read them;
    any other backslash stays as it is."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and text[index + 1:index + 2] in _ESCAPES:
            out.append(_ESCAPES[text[index + 1]])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def escape(text: str) -> str:
    """The inverse of `unescape`, to show a stop string on one line."""
    return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
            .replace("\r", "\\r"))


def format_value(setting: Setting, value: Any) -> str:
    """A value as --help and /show print it: on/off, none, escaped stop strings."""
    if value is None or value == ():
        return "none"
    if setting.kind == "bool":
        return "on" if value else "off"
    if setting.kind == "list":
        return ", ".join(f'"{escape(item)}"' for item in value)
    return str(value)


def shown(value: Any) -> str:
    """A rejected value inside an error message: short, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    text = repr(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:60]


def _in_bounds(setting: Setting, value: float) -> bool:
    low, high = setting.low, setting.high
    return not (low is not None and (value < low or setting.low_open and value == low)
                or high is not None and (value > high or setting.high_open and value == high))


def _number_text(number: float | None) -> str:
    return "" if number is None else f"{number:g}" if isinstance(number, float) else str(number)
