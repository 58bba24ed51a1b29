"""The settings table walked through every front end it names, bounds included, with no model.

For each row: a good value is accepted, and a value out of bounds refused in the words of that
front end (flag: exit 2 naming the flag; config.toml: exit 1 naming the file, line and key;
models.toml: the file, line and key; /set: a usage line naming `/set NAME`; the API: a 400 whose
`param` is the field), and flag > config.toml > catalog > built-in. The commands run in-process
(tests/cli_runner.py) up to the point where they would load a model, and what they would have
loaded or sent is captured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cli_runner import run_cli

from localchat import paths, settings
from localchat.chat.conversation import Conversation, parse_setting
from localchat.chat.slash_commands import completions, run_command
from localchat.config import load_config
from localchat.engine import templates
from localchat.engine.options import _FIELDS, EngineOptions
from localchat.engine.protocol import Sampling
from localchat.errors import ConfigError, UsageError
from localchat.models.catalog import load_catalog
from localchat.render import Environment
from localchat.serve.openai_api import ApiError, parse_request
from localchat.settings import INT32_MAX, SETTINGS, Setting

# Ollama's option names (api/types.go Options and Runner), for the server that will speak it.
OLLAMA_OPTIONS = {
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
    "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty", "stop", "num_ctx",
    "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread",
}
HELLO = [{"role": "user", "content": "hi"}]


def good_values(row: Setting) -> list[Any]:
    """Values the row takes, boundaries included where they are allowed."""
    if row.kind == "bool":
        return [True, False]
    if row.kind == "list":
        return [("END",), ("a", "b")]
    if row.choices:
        return [row.choices[0], row.choices[-1]]
    if row.kind == "str":
        return ["Be brief.", "Be kind."]
    assert row.low is not None
    cast = int if row.kind == "int" else float
    high = None if row.high in (None, INT32_MAX) else row.high
    edges = [None if row.low_open else row.low, None if row.high_open else high]
    inner = [row.low + 1, row.low + 2] if high is None or high - row.low > 2 else [
        (row.low + high) / 2]
    return [cast(value) for value in (edges[0], *inner, edges[1]) if value is not None]


def bad_values(row: Setting) -> list[Any]:
    """Values the row refuses: each bound crossed, and a value of the wrong type."""
    if row.kind == "bool":
        return ["yes"]
    if row.kind == "list":
        return [[5]]
    if row.choices:
        return ["klingon"]
    if row.kind == "str":
        return [5]
    cast = int if row.kind == "int" else float
    values: list[Any] = [cast(row.low) if row.low_open else cast(row.low - 1), "many"]
    if row.high is not None:
        values.append(cast(row.high) if row.high_open else cast(row.high + 1))
    return values


def bad_texts(row: Setting) -> list[Any]:
    """Bad values that can be typed: a flag's or /set's (any text is a stop string or a prompt)."""
    if row.kind == "bool":
        return ["maybe"]
    return [] if row.kind in ("str", "list") and not row.choices else bad_values(row)


def rows(where: str) -> list[Setting]:
    return [row for row in SETTINGS if {
        "flag": row.flag is not None, "config": row.config, "catalog": row.catalog,
        "slash": row.slash, "openai": row.openai is not None}[where]]


def cases(where: str, values: Any) -> list[Any]:
    return [pytest.param(row, value, id=f"{row.name}={value!r}")
            for row in rows(where) for value in values(row)]


def flag_args(row: Setting, value: Any) -> list[str]:
    if row.switch:
        return [row.flag_name] if value else []  # a switch's False is its absence
    if row.kind == "bool":
        return [row.flag_name if value else row.flag.split("/")[-1]]
    if row.kind == "list":
        return [word for item in value for word in (row.flag_name, item)]
    return [row.flag_name, str(value)]


def toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(item) for item in value) + "]"
    return json.dumps(value)


# ---- what the commands would have done -----------------------------------------------------


class Captured(BaseException):
    """Raised by the stand-in for bench's measurement, to stop there (a BaseException, so the
    CLI's one-line handler for unexpected exceptions lets it through)."""


@pytest.fixture
def captured(monkeypatch, tmp_path) -> dict[str, Any]:
    """Stand-ins for everything past the merge: the request run would send, what serve and bench
    would load. `model` is a GGUF path (no catalog defaults), `smollm2` a catalog model."""
    seen: dict[str, Any] = {"model": str(tmp_path / "model.gguf")}
    Path(seen["model"]).write_bytes(b"GGUF")
    import localchat.bench
    import localchat.chat.repl
    import localchat.cli
    import localchat.commands.models
    import localchat.commands.serve
    import localchat.oneshot
    import localchat.serve.server

    def bench(bench_settings: Any, options: Any, progress: Any) -> None:
        seen["engine"] = options
        raise Captured

    def serve(directory: Any, preload: Any, served: Any, note: Any) -> int:
        seen["engine"], seen["sampling"] = preload[0].options, preload[0].sampling
        return 0

    def run_once(request: Any, env: Any) -> int:
        seen["engine"], seen["sampling"], seen["request"] = (
            request.engine, request.sampling, request)
        return 0

    def run_repl(request: Any, env: Any, options: Any) -> int:
        run_once(request, env)
        seen["repl"] = options
        return 0

    monkeypatch.setattr(localchat.oneshot, "run_once", run_once)
    monkeypatch.setattr(localchat.chat.repl, "run_repl", run_repl)
    monkeypatch.setattr(localchat.serve.server, "serve", serve)
    monkeypatch.setattr(localchat.bench, "run_benchmark", bench)
    for module in (localchat.commands.models, localchat.commands.serve):
        monkeypatch.setattr(module, "ensure_local", lambda ref, **_: Path("/m/smollm2.gguf"))
    return seen


def command_line(command: str, model: str, *args: str) -> list[str]:
    return [command, model, "hi", *args] if command == "run" else [command, model, *args]


def merged(seen: dict[str, Any], row: Setting) -> Any:
    """The value a command ended up with for `row`."""
    if row.scope == "sampling":
        return getattr(seen["sampling"], row.name)
    if row.scope == "load":
        return getattr(seen["engine"], _FIELDS[row.name])
    if row.name == "markdown":
        return seen["repl"].markdown
    return getattr(seen["request"], row.name)


def run_until_captured(*argv: str) -> Any:
    try:
        return run_cli(*argv)
    except Captured:
        return None


def write_config(text: str) -> Path:
    path = paths.config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_catalog_entry(line: str) -> Path:
    path = paths.user_catalog_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[m]\n{line}\n[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "x.gguf"\n',
                    encoding="utf-8")
    return path


# ---- the table itself ------------------------------------------------------------------------


def test_the_table_is_consistent_with_the_code_that_holds_its_values():
    names = [row.name for row in SETTINGS]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-z][a-z_]*", n) for n in names)
    # Sampling's fields are the sampling rows, and the output grammar (--schema, --format,
    # --grammar: a request's constraint, not a setting with a default)
    assert set(settings.values_of("sampling", settings.merge({}, {}, {}))) == set(
        Sampling.__dataclass_fields__) - {"grammar"}
    assert {row.name for row in settings.in_scope("load")} == set(_FIELDS)
    assert set(_FIELDS.values()) <= set(EngineOptions.__dataclass_fields__)
    assert settings.CHAT_FORMATS == templates.FORMAT_NAMES
    for row in SETTINGS:
        assert settings.check(row, row.default) is None, row.name
        if row.flag:
            assert row.flag_name == "--" + row.name.replace("_", "-"), row.flag
        assert not row.catalog or row.config  # what a model may set, a user may set too
    for where in ("openai", "ollama"):
        spelled = [getattr(row, where) for row in SETTINGS if getattr(row, where)]
        assert len(spelled) == len(set(spelled)), where
    assert {row.ollama for row in SETTINGS if row.ollama} <= OLLAMA_OPTIONS
    for command in ("run", "serve", "bench"):
        flags = [f for row in settings.for_command(command) for f in row.flags]
        assert len(flags) == len(set(flags))


def test_the_merge_is_flag_then_config_then_catalog_then_built_in():
    for row in SETTINGS:
        name, (one, other) = row.name, good_values(row)[:2]
        assert settings.merge({name: one}, {name: other}, {name: other})[name] == one
        assert settings.merge({}, {name: one}, {name: other})[name] == one
        assert settings.merge({}, {}, {name: one})[name] == one
        assert settings.merge({}, {}, {})[name] == row.default


# ---- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "value"), cases("flag", good_values))
def test_a_flag_is_taken_by_every_command_that_lists_it(captured, monkeypatch, row, value):
    if row.name == "markdown":  # only the chat at a terminal shows it
        monkeypatch.setattr(Environment, "stdin_isatty", property(lambda env: True))
    for command in row.commands:
        argv = command_line(command, captured["model"], *flag_args(row, value))
        if row.name == "markdown":
            argv.remove("hi")
        result = run_until_captured(*argv)
        assert result is None or result.exit_code == 0, (argv, result.stderr)
        assert merged(captured, row) == value, argv


@pytest.mark.parametrize(("row", "value"), [
    case for case in cases("flag", bad_texts) if case.values[0].kind != "bool"])
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(captured, row, value):
    for command in row.commands:
        result = run_cli(*command_line(command, captured["model"], row.flag_name, str(value)))
        assert result.exit_code == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: {row.flag_name} must be ") or \
            f"Invalid value for '{row.flag_name}'" in line, line
        assert "engine" not in captured


def test_flags_the_command_does_not_take_are_refused(captured):
    for row in SETTINGS:
        for command in set(("run", "serve", "bench")) - set(row.commands):
            value = good_values(row)[0]
            result = run_cli(*command_line(command, captured["model"], *flag_args(row, value)))
            assert result.exit_code == 2 and "No such option" in result.stderr, (command, row)


# ---- config.toml -----------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "value"), cases("config", good_values))
def test_a_config_value_is_taken(row, value):
    write_config(f"# mine\n{row.name} = {toml(value)}\n")
    assert load_config().settings[row.name] == value


@pytest.mark.parametrize(("row", "value"), cases("config", bad_values))
def test_a_bad_config_value_names_the_file_the_line_and_the_key(row, value):
    path = write_config(f"# mine\n{row.name} = {toml(value)}\n")
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert caught.value.message.startswith(f"{path}, line 2: {row.name} must be "), \
        caught.value.message
    assert "--" not in caught.value.message


def test_a_setting_config_does_not_take_is_an_unknown_key():
    for row in SETTINGS:
        if not row.config:
            write_config(f"{row.name} = {toml(good_values(row)[0])}\n")
            with pytest.raises(ConfigError, match=f"line 1: unknown setting '{row.name}'"):
                load_config()


def test_top_p_0_in_config_is_exit_1_naming_the_file_line_and_key_not_the_flag(captured):
    path = write_config("ctx = 512\ntop_p = 0\n")
    for command in ("run", "serve", "bench"):
        result = run_until_captured(*command_line(command, captured["model"]))
        assert result.exit_code == 1
        assert result.stderr == f"error: {path}, line 2: top_p must be in (0, 1] (got 0)\n"


# ---- models.toml -----------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "value"), cases("catalog", good_values))
def test_a_catalog_default_is_taken(row, value):
    write_catalog_entry(f"{row.name} = {toml(value)}")
    assert load_catalog().get("m").defaults.get(row.name) == value


@pytest.mark.parametrize(("row", "value"), cases("catalog", bad_values))
def test_a_bad_catalog_default_names_models_toml_the_line_and_the_key(row, value):
    path = write_catalog_entry(f"{row.name} = {toml(value)}")
    with pytest.raises(ConfigError) as caught:
        load_catalog()
    assert caught.value.message.startswith(f"{path}, line 2: {row.name} must be ")


def test_a_setting_the_catalog_does_not_take_is_an_unknown_key():
    for row in SETTINGS:
        if not row.catalog:
            write_catalog_entry(f"{row.name} = {toml(good_values(row)[0])}")
            with pytest.raises(ConfigError, match=f"unknown key '{row.name}'"):
                load_catalog()


# ---- /set and /show --------------------------------------------------------------------------


def as_text(row: Setting, value: Any) -> str:
    if row.kind == "bool":
        return "on" if value else "off"
    if row.kind == "list":
        return value[0]
    return str(value)


@pytest.mark.parametrize(("row", "value"), cases("slash", good_values))
def test_set_takes_a_value(row, value):
    expected = value[:1] if row.kind == "list" else value
    assert parse_setting(row.name, as_text(row, value)) == (row.name, expected)


@pytest.mark.parametrize(("row", "value"), cases("slash", bad_texts))
def test_set_refuses_a_bad_value_naming_set_and_the_setting(row, value):
    with pytest.raises(UsageError) as caught:
        parse_setting(row.name, str(value))
    assert caught.value.message.startswith(f"/set {row.name} must be ")
    assert caught.value.hint.startswith(f"e.g. /set {row.name} ")


def fake_chat() -> SimpleNamespace:
    info = SimpleNamespace(model_path="m.gguf", backend="CPU", chat_format="chatml",
                           chat_format_source="model file")
    import io

    return SimpleNamespace(
        env=Environment(stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO()),
        sampling=Sampling(), markdown=True, conversation=Conversation(), model="m",
        engine=SimpleNamespace(info=info, n_ctx=4096), store=None, record=None, name=None,
        with_history=lambda change: None, refresh_usage=lambda: None)


def test_set_changes_the_chat_and_show_lists_every_set_setting():
    chat = fake_chat()
    for row in rows("slash"):
        value = good_values(row)[-1]
        run_command(chat, f"/set {row.name} {as_text(row, value)}")
        if row.scope == "sampling":
            assert getattr(chat.sampling, row.name) == (value[:1] if row.kind == "list" else value)
    assert chat.markdown is False and chat.conversation.system == "Be kind."
    run_command(chat, "/show")
    shown = chat.env.stdout.getvalue()
    for row in rows("slash"):
        label = "system prompt" if row.name == "system" else row.name
        assert re.search(rf"^{label} +\S", shown, re.MULTILINE), label
    assert completions(chat, "/set ") == [row.name for row in rows("slash")]
    assert completions(chat, "/set markdown o") == ["on", "off"]


def test_show_says_why_auto_does_not_draft_and_that_ngram_may_change_the_text():
    chat = fake_chat()
    chat.engine.info.inexact_drafts = "with 2 threads, llama.cpp divides one token's work"
    run_command(chat, "/show")
    assert re.search(r"^draft +auto \(not drafting: with 2 threads", chat.env.stdout.getvalue(),
                     re.MULTILINE)
    run_command(chat, "/set draft ngram")
    run_command(chat, "/show")
    assert "ngram (the text may differ: with 2 threads" in chat.env.stdout.getvalue()


# ---- the server's requests -------------------------------------------------------------------


@pytest.mark.parametrize(("row", "value"), cases("openai", good_values))
def test_a_request_field_is_taken(row, value):
    for field in filter(None, (row.openai, row.openai_alias)):
        body = {"messages": HELLO, field: list(value) if row.kind == "list" else value}
        assert getattr(parse_request("chat", body, Sampling()).sampling, row.name) == value


def bad_fields(row: Setting) -> list[Any]:
    """Bad JSON values: as bad_values, but top_k's -1 is vLLM's "off", so -2 is the first bad."""
    return [-2 if row.name == "top_k" and value == -1 else value for value in bad_values(row)]


@pytest.mark.parametrize(("row", "value"), cases("openai", bad_fields))
def test_a_bad_request_field_is_a_400_naming_the_field(row, value):
    with pytest.raises(ApiError) as caught:
        parse_request("chat", {"messages": HELLO, row.openai: value}, Sampling())
    assert caught.value.status == 400 and caught.value.param == row.openai
    assert caught.value.message.startswith(f"{row.openai} must be "), caught.value.message


def test_a_field_left_out_keeps_the_servers_defaults_which_are_runs(captured):
    write_config("temperature = 0.3\n")
    run_cli("serve", "smollm2", "--threads", "1")
    defaults = captured["sampling"]
    assert (defaults.temperature, defaults.top_p) == (0.3, 0.9)  # config, then smollm2's catalog
    assert parse_request("chat", {"messages": HELLO}, defaults).sampling == defaults


# ---- precedence, end to end ----------------------------------------------------------------


def test_flag_beats_config_beats_catalog_beats_built_in(captured):
    write_config("temperature = 0.3\nctx = 1024\n")
    run_cli("run", "smollm2", "hi", "--temperature", "0.6")
    assert captured["sampling"].temperature == 0.6  # flag
    assert captured["engine"].n_ctx == 1024  # config over smollm2's catalog 4096
    assert captured["sampling"].top_p == 0.9  # smollm2's catalog over the built-in 0.95
    assert captured["sampling"].min_p == settings.get("min_p").default  # built-in
    run_cli("run", captured["model"], "hi")
    assert captured["sampling"].top_p == settings.get("top_p").default  # a path has no catalog


# ---- stop strings: the escapes a shell cannot type (rough edges, item 3) -------------------


def test_stop_reads_backslash_escapes_from_the_flag_config_and_set(captured):
    run_cli("run", captured["model"], "hi", "--stop", r"\n\n", "--stop", r"a\tb\\n")
    assert captured["sampling"].stop == ("\n\n", "a\tb\\n")
    write_config("stop = '\\n'\n")  # a TOML literal string: the backslash reaches us
    run_cli("run", captured["model"], "hi")
    assert captured["sampling"].stop == ("\n",)
    write_config('stop = ["\\\\n", "END"]\n')  # TOML's own escape first: \\n is \n for us
    assert load_config().settings["stop"] == ("\n", "END")
    assert parse_setting("stop", r" \n\n ") == ("stop", ("\n\n",))
    assert parse_setting("stop", "") == ("stop", ())  # /set stop alone clears it
    assert parse_request("chat", {"messages": HELLO, "stop": "\\n"}, Sampling()).sampling.stop \
        == ("\\n",)  # JSON has its own escapes: a request's text is taken as it is
    help_text = " ".join(run_cli("run", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert r"\n, \t, \r and \\ are escapes" in help_text


# ---- --help (rough edges, item 16) -----------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "serve", "bench"])
def test_help_shows_each_flag_with_its_help_and_default_and_no_markup_is_lost(command):
    result = run_cli(command, "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "<bool>" not in text
    for row in settings.for_command(command):
        assert f"{row.help} [default: {row.default_text}]" in text, row.name
    if command == "run":
        assert "has a [remote] section" in text
        assert "[default: 0.8]" in text and "--mmap / --no-mmap" in text


def test_every_option_of_every_command_has_help():
    import typer

    from localchat import cli

    def commands(group: Any) -> Any:
        for command in group.commands.values():
            yield command
            if hasattr(command, "commands"):
                yield from commands(command)

    for command in commands(typer.main.get_command(cli.app)):
        for param in command.params:
            assert param.help, f"{command.name} {param.name}"


def test_a_usage_error_in_a_command_points_at_that_commands_help():
    result = run_cli("run", "model.gguf", "--top-p")
    assert result.exit_code == 2
    assert result.stderr == ("error: Option '--top-p' requires an argument. "
                             "(see `localchat run --help`)\n")
    result = run_cli("history", "export", "x", "--format")
    assert "(see `localchat history export --help`)" in result.stderr
