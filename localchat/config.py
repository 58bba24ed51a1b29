"""The user's defaults in `config.toml`; command-line flags override them.

Its keys are the settings table's rows (`settings.SETTINGS`, where `config` is true), plus the
few that only this file has: `model`, `snapshot_cap_mb` and the `[remote]` table. A mistake is
a `ConfigError` (exit 1) naming the file, the line and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localchat import paths, settings
from localchat.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """What config.toml sets; None, or a setting missing from `settings`, means "not set"."""

    settings: Mapping[str, Any] = field(default_factory=dict)  # table rows by name, checked
    model: str | None = None
    snapshot_cap_mb: int | None = None  # KV-cache snapshots kept for resuming chats (LRU)
    remote_endpoint: str | None = None  # [remote] endpoint: run talks to this server by default
    remote_model: str | None = None  # [remote] model: the server's model id


# Keys of this file that are not settings rows: name -> (type, how to say it).
_OWN_KEYS: dict[str, tuple[type, str]] = {
    "model": (str, "text"), "snapshot_cap_mb": (int, "an integer"),
}

def known_keys() -> list[str]:
    """Every top-level key config.toml takes, in the order the README lists them."""
    return ["model", *(s.name for s in settings.SETTINGS if s.config), "snapshot_cap_mb",
            "[remote]"]


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
            own[key] = value
        else:
            raise ConfigError(f"{where}: unknown setting '{key}'",
                              f"known settings: {', '.join(known_keys())}")
    return Config(settings=values, model=own.get("model"),
                  snapshot_cap_mb=own.get("snapshot_cap_mb"),
                  remote_endpoint=remote.get("remote_endpoint"),
                  remote_model=remote.get("remote_model"))


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
