"""Output: streamed text on stdout, stats and errors on stderr, colour only on a terminal."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from localchat.errors import LocalchatError


@dataclass
class Environment:
    """The process's streams and terminal facts, replaceable in tests (after httpie's)."""

    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def stdin_isatty(self) -> bool:
        """True when a person, not a pipe, is behind stdin."""
        return _isatty(self.stdin)

    @property
    def stdout_isatty(self) -> bool:
        """True when stdout is a terminal."""
        return _isatty(self.stdout)

    @property
    def stderr_color(self) -> bool:
        """Colour on stderr only on a terminal, and never with NO_COLOR set (no-color.org)."""
        return _isatty(self.stderr) and not os.environ.get("NO_COLOR")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream and stream.isatty())
    except (ValueError, OSError):
        return False


def read_piped_input(env: Environment) -> str | None:
    """Text piped on stdin, or None at a terminal; undecodable bytes are replaced, not fatal."""
    if env.stdin is None or env.stdin_isatty:
        return None
    buffer = getattr(env.stdin, "buffer", None)
    data = buffer.read() if buffer is not None else env.stdin.read()
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    return data


class TextSink:
    """Writes reply pieces to stdout as they arrive, flushing so pipes see them at once."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.ends_with_newline = True

    def write(self, piece: str) -> None:
        """Write one piece of the reply."""
        if piece:
            self.env.stdout.write(piece)
            self.env.stdout.flush()
            self.ends_with_newline = piece.endswith("\n")

    def finish(self) -> None:
        """End the reply on its own line."""
        if not self.ends_with_newline:
            self.env.stdout.write("\n")
            self.ends_with_newline = True
        self.env.stdout.flush()


def _style(env: Environment, text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if env.stderr_color else text


def print_error(env: Environment, error: LocalchatError) -> None:
    """One line on stderr: what went wrong, then what to do."""
    message = _style(env, "error:", "1;31") + f" {error.message}"
    if error.hint:
        message += f" ({error.hint})"
    print(message, file=env.stderr)


def print_note(env: Environment, text: str) -> None:
    """An informational line on stderr, dimmed on a terminal."""
    print(_style(env, text, "2"), file=env.stderr)


def format_rate(value: float | None) -> str:
    """Tokens per second, or a dash when there was too little to time."""
    return f"{value:,.1f} tok/s" if value else "- tok/s"


def format_stats(load: Any, stats: Any) -> str:
    """The one-line timing summary `--verbose` prints after a reply."""
    parts = []
    if load is not None:
        parts.append(f"load {load.load_s:.2f} s")
    parts += [
        f"first token {stats.ttft_s * 1000:.0f} ms",
        f"prompt {stats.prompt_tokens} tok ({stats.cached_tokens} cached), "
        f"prefill {format_rate(stats.prefill_tokens_per_s)}",
        f"reply {stats.completion_tokens} tok, decode {format_rate(stats.decode_tokens_per_s)}",
        f"finish {stats.finish_reason}",
    ]
    return " · ".join(parts)


def stats_record(text: str, load: Any, stats: Any, model: str) -> dict[str, Any]:
    """The `--json` object for one reply: text, finish reason, token counts, timings."""
    return {
        "model": model,
        "text": text,
        "finish_reason": stats.finish_reason,
        "prompt_tokens": stats.prompt_tokens,
        "cached_prompt_tokens": stats.cached_tokens,
        "completion_tokens": stats.completion_tokens,
        "load_s": round(load.load_s, 4) if load is not None else None,
        "ttft_s": round(stats.ttft_s, 4),
        "prefill_s": round(stats.prefill_s, 4),
        "decode_s": round(stats.decode_s, 4),
        "prefill_tokens_per_s": _round(stats.prefill_tokens_per_s),
        "decode_tokens_per_s": _round(stats.decode_tokens_per_s),
        "n_ctx": load.n_ctx if load is not None else None,
        "threads": load.threads if load is not None else None,
        "backend": load.backend if load is not None else None,
        "chat_format": load.chat_format if load is not None else None,
    }


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def print_json(env: Environment, record: dict[str, Any]) -> None:
    """One JSON object on one line of stdout."""
    env.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    env.stdout.flush()
