"""The user's defaults in `config.toml`; command-line flags override them.

Its keys are the settings table's rows (`settings.SETTINGS`, where `config` is true), plus the
few that only this file has: `model`, `snapshot_cap_mb`, the `[remote]` table and the
`[presets.NAME]` tables (a model, any of the rows, and an output constraint and files). A
mistake is a `ConfigError` (exit 1) naming the file, the line and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localchat import paths, settings
from localchat.errors import ConfigError, UsageError


@dataclass(frozen=True)
class Config:
    """What config.toml sets; None, or a setting missing from `settings`, means "not set"."""

    settings: Mapping[str, Any] = field(default_factory=dict)  # table rows by name, checked
    model: str | None = None
    snapshot_cap_mb: int | None = None  # KV-cache snapshots kept for resuming chats (LRU)
    remote_endpoint: str | None = None  # [remote] endpoint: run talks to this server by default
    remote_model: str | None = None  # [remote] model: the server's model id
    presets: Mapping[str, Preset] = field(default_factory=dict)  # [presets.NAME], by name

    @property
    def snapshot_cap_bytes(self) -> int | None:
        """The cap in bytes (sizes are decimal MB everywhere); None: the built-in cap."""
        return None if self.snapshot_cap_mb is None else self.snapshot_cap_mb * 1_000_000


@dataclass(frozen=True)
class Preset:
    """A `[presets.NAME]` table: what `--preset NAME` and `/preset NAME` start from."""

    name: str
    base: Path  # where its relative paths (schema, grammar, files) start: the config's folder
    model: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)  # table rows by name, checked
    schema: str | Mapping[str, Any] | None = None  # as --schema takes it, or a JSON Schema table
    format: str | None = None  # "json"
    grammar: str | None = None  # a GBNF file
    files: tuple[str, ...] = ()  # attached first, before any -f

    @property
    def summary(self) -> str:
        """One line for `localchat list --presets`: what the preset sets besides model/system."""
        parts = [f"{name}={settings.format_value(settings.get(name), value)}"
                 for name, value in self.settings.items() if name != "system"]
        if self.schema is not None:
            parts.append("schema")
        if self.format:
            parts.append(f"format={self.format}")
        if self.grammar:
            parts.append(f"grammar={self.grammar}")
        if self.files:
            parts.append(f"files={','.join(self.files)}")
        return " ".join(parts)


# Keys of this file that are not settings rows: name -> (type, how to say it).
_OWN_KEYS: dict[str, tuple[type, str]] = {
    "model": (str, "text"), "snapshot_cap_mb": (int, "an integer"),
}

def known_keys() -> list[str]:
    """Every top-level key config.toml takes, in the order the README lists them."""
    return ["model", *(s.name for s in settings.SETTINGS if s.config), "snapshot_cap_mb",
            "[remote]", "[presets.NAME]"]


PRESET_KEYS = ("model", "schema", "format", "grammar", "files")  # besides the settings rows


def load_config(path: Path | None = None) -> Config:
    """Read `config.toml`; a missing file is an empty config, a broken one an error naming it."""
    path = path or paths.config_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "fix or delete the file") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}", "fix the TOML syntax on that line") from exc
    remote = _remote(data.pop("remote", {}), path, text)
    presets = _presets(data.pop("presets", {}), path, text)
    values: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}, line {_line_of(text, key)}"
        setting = settings.find(key)
        if setting is not None and setting.config:
            values[key] = _checked(setting, value, where)
        elif key in _OWN_KEYS:
            kind, words = _OWN_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ConfigError(f"{where}: {key} must be {words} "
                                  f"(got {settings.shown(value)})")
            if key == "snapshot_cap_mb" and isinstance(value, int) and value < 0:
                raise ConfigError(f"{where}: snapshot_cap_mb must be 0 or more (got {value})",
                                  "0 keeps no snapshots; leave it out for the 2,000 MB default")
            own[key] = value
        else:
            raise ConfigError(f"{where}: unknown setting '{key}'",
                              f"known settings: {', '.join(known_keys())}")
    return Config(settings=values, model=own.get("model"),
                  snapshot_cap_mb=own.get("snapshot_cap_mb"),
                  remote_endpoint=remote.get("remote_endpoint"),
                  remote_model=remote.get("remote_model"), presets=presets)


def _presets(tables: Any, path: Path, text: str) -> dict[str, Preset]:
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}, line {_line_of(text, 'presets')}: 'presets' must be tables",
                          '[presets.commit]\nsystem = "Write a commit message"')
    return {name: _preset(name, table, path, text) for name, table in tables.items()}


def _preset(name: str, table: Any, path: Path, text: str) -> Preset:
    header = f"[presets.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{path}, line {_line_in_table(text, name, None)}: {header} must be a "
                          "table of settings", f'{header}\nmodel = "smollm2"')
    values: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{path}, line {_line_in_table(text, name, key)}"
        setting = settings.find(key)
        if setting is not None and setting.config:
            values[key] = _checked(setting, value, f"{where}: {header}")
        elif key in ("model", "format", "grammar") or key == "schema" and isinstance(value, str):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: {header} {key} must be text "
                                  f"(got {settings.shown(value)})")
            if key == "format" and value.strip().lower() != "json":
                raise ConfigError(f"{where}: {header} format must be \"json\" "
                                  f"(got {settings.shown(value)})",
                                  "a schema goes in `schema`, a GBNF file in `grammar`")
            own[key] = value.strip().lower() if key == "format" else value
        elif key == "schema" and isinstance(value, dict):
            own[key] = value  # a JSON Schema written as a TOML table
        elif key == "files" and (isinstance(value, str) or isinstance(value, list) and all(
                isinstance(item, str) for item in value)):
            own[key] = (value,) if isinstance(value, str) else tuple(value)
        elif key in ("schema", "files"):
            raise ConfigError(f"{where}: {header} {key} must be "
                              f"{'text or a table' if key == 'schema' else 'a list of paths'} "
                              f"(got {settings.shown(value)})")
        else:
            keys = [*PRESET_KEYS, *(s.name for s in settings.SETTINGS if s.config)]
            raise ConfigError(f"{where}: {header} has an unknown setting '{key}'",
                              f"a preset takes: {', '.join(keys)}")
    return Preset(name=name, base=path.parent, settings=values, model=own.get("model"),
                  schema=own.get("schema"), format=own.get("format"),
                  grammar=own.get("grammar"), files=own.get("files", ()))


def _line_in_table(text: str, table: str, key: str | None) -> int:
    """The line of `key` inside `[presets.TABLE]` (the header's line when key is None)."""
    name = re.escape(table)
    header = re.compile(rf"^[ \t]*\[[ \t]*presets[ \t]*\.[ \t]*(?:{name}|\"{name}\"|'{name}')"
                        r"[ \t]*\]", re.MULTILINE)
    match = header.search(text)
    if match is None:  # an inline table, or dotted keys: the line that names it
        found = re.search(rf"^[ \t]*(?:presets[ \t]*\.[ \t]*)?{name}[ \t]*[.=]", text,
                          re.MULTILINE)
        return text.count("\n", 0, found.start()) + 1 if found else 0
    start = match.end()
    if key is not None:
        following = re.search(r"^[ \t]*\[", text[start:], re.MULTILINE)
        section = text[start: start + following.start()] if following else text[start:]
        found = re.search(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", section, re.MULTILINE)
        if found:
            return text.count("\n", 0, start + found.start()) + 1
    return text.count("\n", 0, match.start()) + 1


def _checked(setting: settings.Setting, value: Any, where: str) -> Any:
    """A row's value from the file: a stop may be one string, and its escapes are read."""
    if setting.kind == "list" and isinstance(value, str):
        value = [value]
    if setting.kind == "list" and isinstance(value, list):
        value = [settings.unescape(item) if isinstance(item, str) else item for item in value]
    try:
        return settings.checked(setting, value)
    except settings.Invalid as problem:
        raise ConfigError(f"{where}: {setting.name} {problem}") from None


def _remote(remote: object, path: Path, text: str) -> dict[str, str]:
    if not isinstance(remote, dict):
        raise ConfigError(f"{path}, line {_line_of(text, 'remote')}: 'remote' must be a table",
                          '[remote]\nendpoint = "http://gpu-box:8000/v1"')
    for key, value in remote.items():
        if key not in ("endpoint", "model") or not isinstance(value, str):
            raise ConfigError(f"{path}, line {_line_of(text, key)}: [remote] takes "
                              f"endpoint and model as text (got '{key}')",
                              "the API key goes in $LOCALCHAT_API_KEY, never in a file")
    return {f"remote_{key}": value for key, value in remote.items()}


def _line_of(text: str, key: str) -> int:
    match = re.search(rf"^\s*{re.escape(key)}\s*=", text, re.MULTILINE)
    return text.count("\n", 0, match.start()) + 1 if match else 0


def find_preset(config: Config, name: str) -> Preset:
    """The preset called `name`; an unknown one is a usage error with the closest names."""
    import difflib

    preset = config.presets.get(name)
    if preset is not None:
        return preset
    close = difflib.get_close_matches(name, list(config.presets), n=3, cutoff=0.5)
    if close:
        hint = f"did you mean {' or '.join(close)}? (localchat list --presets)"
    elif config.presets:
        hint = f"presets: {', '.join(sorted(config.presets))}"
    else:
        hint = f"add a [presets.{name}] table to {paths.config_file()}"
    raise UsageError(f"no preset {name!r} in config.toml", hint)
