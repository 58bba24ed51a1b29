"""The user's defaults in `config.toml`; command-line flags override them."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from localchat import paths
from localchat.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """Defaults a user can set once; None means "not set, use the built-in default"."""

    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    threads: int | None = None
    ctx: int | None = None
    gpu_layers: int | None = None
    mmap: bool | None = None
    flash_attn: bool | None = None
    chat_format: str | None = None
    markdown: bool | None = None
    history: bool | None = None
    snapshot_cap_mb: int | None = None  # KV-cache snapshots kept for resuming chats (LRU)
    remote_endpoint: str | None = None  # [remote] endpoint: run talks to this server by default
    remote_model: str | None = None  # [remote] model: the server's model id


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "system": (str,), "chat_format": (str,),
    "temperature": (float, int), "top_p": (float, int), "min_p": (float, int),
    "repeat_penalty": (float, int),
    "top_k": (int,), "seed": (int,), "max_tokens": (int,), "threads": (int,), "ctx": (int,),
    "gpu_layers": (int,), "snapshot_cap_mb": (int,),
    "mmap": (bool,), "flash_attn": (bool,), "markdown": (bool,), "history": (bool,),
    "remote_endpoint": (str,), "remote_model": (str,),
}

EXAMPLE = """\
# localchat defaults; command-line flags override these.
# model = "smollm2"
# temperature = 0.7
# ctx = 4096
# threads = 4
# markdown = true
"""


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
    remote = data.pop("remote", {})
    if not isinstance(remote, dict):
        raise ConfigError(f"{path}, line {_line_of(text, 'remote')}: 'remote' must be a table",
                          '[remote]\nendpoint = "http://gpu-box:8000/v1"')
    for key, value in remote.items():
        if key not in ("endpoint", "model") or not isinstance(value, str):
            raise ConfigError(f"{path}, line {_line_of(text, key)}: [remote] takes "
                              f"endpoint and model as text (got '{key}')",
                              "the API key goes in $LOCALCHAT_API_KEY, never in a file")
        data[f"remote_{key}"] = value
    known = {f.name for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        line = _line_of(text, key)
        if key not in known:
            raise ConfigError(
                f"{path}, line {line}: unknown setting '{key}'",
                f"known settings: {', '.join(sorted(known))}",
            )
        expected = _TYPES[key]
        if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
            raise ConfigError(
                f"{path}, line {line}: '{key}' must be {expected[0].__name__}, "
                f"not {type(value).__name__}",
            )
        values[key] = float(value) if expected[0] is float else value
    return Config(**values)


def _line_of(text: str, key: str) -> int:
    match = re.search(rf"^\s*{re.escape(key)}\s*=", text, re.MULTILINE)
    return text.count("\n", 0, match.start()) + 1 if match else 0
