"""Presets: [presets.NAME] tables in config.toml, used by --preset and listed by `list --presets`.

The run is captured where it would load a model (as in test_settings.py), so what a preset set,
and what a flag overrode, can be read from the request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_cli

from localchat import paths, settings
from localchat.config import load_config
from localchat.engine.options import _FIELDS
from localchat.errors import ConfigError
from localchat.render import Environment

COMMIT = '''\
temperature = 0.7
system = "config's system prompt"

[presets.commit]
model = "smollm2:360m"
system = "Write a commit message for this diff."
temperature = 0.2
max_tokens = 80
stop = ["\\n\\n"]
files = ["style.md"]

[presets.person]
schema = "name, age int"

[presets.shape.schema]
type = "object"
properties = { colour = { type = "string" } }
required = ["colour"]
'''


def write_config(text: str) -> Path:
    path = paths.config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def captured(monkeypatch, tmp_path) -> dict[str, Any]:
    """The request `run` would send, instead of loading a model."""
    import localchat.chat.repl
    import localchat.cli
    import localchat.commands.models
    import localchat.oneshot

    seen: dict[str, Any] = {}

    def run_once(request: Any, env: Any) -> int:
        seen["request"] = request
        return 0

    def run_repl(request: Any, env: Any, options: Any) -> int:
        seen["request"], seen["repl"] = request, options
        return 0

    monkeypatch.setattr(localchat.oneshot, "run_once", run_once)
    monkeypatch.setattr(localchat.chat.repl, "run_repl", run_repl)
    monkeypatch.setattr(localchat.commands.models, "ensure_local",
                        lambda ref, **_: Path(f"/m/{ref.name}"))
    return seen


def test_a_preset_gives_model_system_settings_and_files(captured):
    write_config(COMMIT)
    result = run_cli("run", "--preset", "commit", stdin="diff --git a/x b/x\n")
    assert result.exit_code == 0, result.stderr
    request = captured["request"]
    assert request.model == "smollm2:360m"
    assert request.system == "Write a commit message for this diff."
    assert (request.sampling.temperature, request.sampling.max_tokens) == (0.2, 80)
    assert request.sampling.stop == ("\n\n",)
    assert [(ref.argument, ref.base) for ref in request.files] == [
        ("style.md", paths.config_file().parent)]
    assert request.settings == {"preset": "commit"}


def test_flags_override_the_preset_and_a_lone_argument_is_the_prompt(captured):
    write_config(COMMIT)
    result = run_cli("run", "--preset", "commit", "Be terse", "--temperature", "0.9",
                     "--system", "mine", "-f", "extra.txt")
    assert result.exit_code == 0, result.stderr
    request = captured["request"]
    assert (request.prompt, request.model) == ("Be terse", "smollm2:360m")
    assert (request.sampling.temperature, request.system) == (0.9, "mine")
    assert [ref.argument for ref in request.files] == ["style.md", "extra.txt"]  # preset's first
    result = run_cli("run", "smollm2", "Be terse", "--preset", "commit")
    assert captured["request"].model.startswith("smollm2:q4")  # MODEL PROMPT names the model


def test_a_preset_schema_as_text_or_as_a_toml_table(captured):
    write_config(COMMIT)
    assert run_cli("run", "--preset", "person", "Invent one").exit_code == 0
    assert captured["request"].sampling.grammar.schema["required"] == ["name", "age"]
    assert run_cli("run", "--preset", "shape", "A colour").exit_code == 0
    assert captured["request"].sampling.grammar.schema["required"] == ["colour"]
    assert run_cli("run", "--preset", "shape", "A colour", "--format", "json").exit_code == 0
    assert captured["request"].sampling.grammar.kind == "json"  # the flag wins


def test_every_setting_of_the_table_can_be_in_a_preset(captured, monkeypatch):
    values = {"temperature": 0.3, "top_p": 0.5, "top_k": 7, "min_p": 0.1,
              "repeat_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
              "seed": 9, "max_tokens": 33, "stop": ["END"], "ctx": 777, "threads": 3,
              "gpu_layers": 0, "cpu": True, "mmap": False, "mlock": True, "flash_attn": False,
              "chat_format": "chatml", "system": "S", "markdown": False, "history": False,
              "think": False, "think_budget": 5, "draft": "off",
              "cache_type": "f16"}  # a quantized cache needs the flash attention this turns off
    rows = {row.name for row in settings.SETTINGS if row.config}
    assert rows <= set(values), f"a new row needs a value here: {rows - set(values)}"
    lines = [f"{name} = {json.dumps(value)}" for name, value in values.items() if name in rows]
    write_config("[presets.all]\n" + "\n".join(lines) + "\n")
    assert run_cli("run", "--preset", "all", "hi").exit_code == 0
    request = captured["request"]
    for name in rows:
        row = settings.get(name)
        expected = tuple(values[name]) if row.kind == "list" else values[name]
        if row.scope == "sampling":
            assert getattr(request.sampling, name) == expected, name
        elif row.scope == "load":
            assert getattr(request.engine, _FIELDS[name]) == expected, name
        elif name in ("system", "history"):
            assert getattr(request, name) == expected, name
    monkeypatch.setattr(Environment, "stdin_isatty", property(lambda env: True))
    assert run_cli("run", "--preset", "all").exit_code == 0  # at a terminal: the chat
    assert captured["repl"].markdown is False


def test_an_unknown_preset_gets_suggestions():
    write_config(COMMIT)
    result = run_cli("run", "--preset", "comit", "hi")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: no preset 'comit' in config.toml (did you mean "
                                     "commit? (localchat list --presets))")
    write_config("")
    result = run_cli("run", "--preset", "commit", "hi")
    assert result.exit_code == 2 and "add a [presets.commit] table to" in result.stderr


@pytest.mark.parametrize(("table", "line", "message"), [
    ('[presets.x]\nmodel = "a"\ntemprature = 0.2\n', 3,
     "[presets.x] has an unknown setting 'temprature'"),
    ('top_p = 0.5\n[presets.x]\ntop_p = 0\n', 3, "[presets.x]: top_p must be in (0, 1]"),
    ('[presets.x]\nformat = "yaml"\n', 2, '[presets.x] format must be "json"'),
    ('[presets.x]\nfiles = [1]\n', 2, "[presets.x] files must be a list of paths"),
    ('[presets]\nx = 3\n', 2, "[presets.x] must be a table"),
    ('[presets.a]\nseed = 1\n\n[presets.b]\nmodel = "m"\nseed = -1\n', 6,
     "[presets.b]: seed must be"),
])
def test_a_bad_preset_is_a_config_error_with_file_and_line(table, line, message):
    path = write_config(table)
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert caught.value.message.startswith(f"{path}, line {line}: {message}")
    result = run_cli("run", "smollm2", "hi")
    assert result.exit_code == 1 and f"line {line}" in result.stderr


def test_list_presets_shows_them(monkeypatch):
    result = run_cli("list", "--presets")
    assert result.exit_code == 0 and "no presets yet" in result.stderr
    write_config(COMMIT)
    result = run_cli("list", "--presets")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "SYSTEM", "SETTINGS"]
    commit = next(line for line in lines if line.startswith("commit"))
    assert "smollm2:360m" in commit and "Write a commit message" in commit
    assert "temperature=0.2" in commit and "files=style.md" in commit
    listed = json.loads(run_cli("list", "--presets", "--json").stdout)["presets"]
    assert [p["name"] for p in listed] == ["commit", "person", "shape"]
    assert listed[2]["schema"]["required"] == ["colour"]


def test_a_lone_argument_is_the_model_only_when_it_names_one(captured, monkeypatch):
    write_config(COMMIT)
    monkeypatch.setattr(Environment, "stdin_isatty", property(lambda env: True))
    assert run_cli("run", "smollm2", "--preset", "commit").exit_code == 0
    assert "repl" in captured and captured["request"].model.startswith("smollm2:q4")
    captured.clear()
    assert run_cli("run", "hello", "--preset", "commit").exit_code == 0
    assert "repl" not in captured and captured["request"].prompt == "hello"  # one-shot
    assert captured["request"].model == "smollm2:360m"
