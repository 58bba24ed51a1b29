"""Output: streamed text on stdout, stats and errors on stderr, colour only on a terminal."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TextIO

from localchat import table_cells
from localchat.errors import LocalchatError
from localchat.table_cells import Cell

if TYPE_CHECKING:  # for annotations only: the CLI imports this module for --help
    from datetime import datetime

    from localchat.engine.protocol import EngineInfo, GenerationStats
    from localchat.engine.reasoning import Thinking
    from localchat.history.records import MessageRecord
    from localchat.models.catalog import ModelRef
    from localchat.models.gguf_reader import MemoryEstimate, ModelInfo


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


def _isatty(stream: IO[str] | None) -> bool:
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


class PlainStream:
    """The same interface for raw text: `--no-markdown`, and output that is not a terminal.

    A model's text is untrusted: on a terminal its control characters are shown escaped
    (`terminal_safe`) and carriage returns dropped; a pipe gets the text exactly.
    """

    def __init__(self, file: IO[str]) -> None:
        self._file = file
        self._safe = _isatty(file)
        self._at_line_start = True
        self._done = False

    def __enter__(self) -> PlainStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()

    def feed(self, text: str) -> None:
        """Write a piece as it is and flush, so a pipe sees it at once."""
        if text and self._safe:
            text = terminal_safe(text.replace("\r", ""))
        if text:
            self._file.write(text)
            self._file.flush()
            self._at_line_start = text.endswith("\n")

    def finish(self) -> None:
        """End the answer on its own line; safe to repeat."""
        if self._done:
            return
        self._done = True
        if not self._at_line_start:
            self._file.write("\n")
        self._file.flush()

    close = finish


class ThinkingView:
    """A reply's thinking while it streams, apart from the answer.

    "fold" (the answer goes to a terminal): the thinking streams dimmed, no markdown, its last
    lines in view, and folds to one line when the answer begins ("thought for 12.3 s, 340
    tokens"). "show" (--show-thinking): it streams on stderr, dimmed on a terminal, and stays.
    "hide" (a pipe): nothing; the caller keeps the text for --json and the history.
    """

    def __init__(self, env: Environment, show: bool = False, hint: str = "",
                 console: Any = None) -> None:
        self.mode = "show" if show else "fold" if env.stdout_isatty else "hide"
        self._env, self._hint, self._console = env, hint, console
        self._started: float | None = None
        self._text: list[str] = []
        self._tokens = 0
        self._live: Any = None
        self._shown_at = 0.0
        self._at_line_start = True
        self.done = False
        self.seconds = 0.0  # how long the thinking took, once finished

    def feed(self, text: str, tokens: int = 0) -> None:
        """A piece of thinking; `tokens` is the count so far when the engine knows it."""
        import time

        if self._started is None:
            self._started = time.perf_counter()
        self._tokens = tokens or self._tokens + 1
        self._text.append(text)
        if self.mode == "show" and text:
            self._env.stderr.write(_style(self._env, text, "2"))
            self._env.stderr.flush()
            self._at_line_start = text.endswith("\n")
        elif self.mode == "fold" and time.perf_counter() - self._shown_at > 0.05:
            self._show_tail()

    def finish(self) -> None:
        """The thinking is over (the answer begins, or the reply ended): fold it; safe to repeat."""
        import time

        if self.done or self._started is None:
            return
        self.done = True
        self.seconds = seconds = time.perf_counter() - self._started
        if self.mode == "show":
            if not self._at_line_start:
                self._env.stderr.write("\n")
            self._env.stderr.flush()
        elif self.mode == "fold":
            if self._live is not None:
                self._live.stop()
            line = f"thought for {seconds:.1f} s, {self._tokens} tokens"
            print(_style_stdout(self._env, line + (f"; {self._hint}" if self._hint else ""),
                                "2"), file=self._env.stdout, flush=True)

    def _show_tail(self) -> None:
        import time

        from rich.live import Live
        from rich.text import Text

        if self._live is None:
            if self._console is None:
                from rich.console import Console

                self._console = Console(file=self._env.stdout,
                                        no_color=bool(os.environ.get("NO_COLOR")))
            self._live = Live(console=self._console, transient=True, auto_refresh=False,
                              vertical_overflow="crop")
            self._live.start()
        width, height = self._console.width or 80, max((self._console.height or 24) - 3, 1)
        assert self._started is not None
        rows, lines = 0, []
        for line in reversed("".join(self._text)[-8000:].split("\n")):
            rows += max(1, -(-len(line) // width))
            if rows > height:
                break
            lines.append(line)
        elapsed = time.perf_counter() - self._started
        self._live.update(Text(f"thinking... {elapsed:.1f} s, {self._tokens} tokens\n"
                               + "\n".join(reversed(lines)), style="dim"), refresh=True)
        self._shown_at = time.perf_counter()


def _style_stdout(env: Environment, text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if env.stdout_isatty and not os.environ.get(
        "NO_COLOR") else text


def _style(env: Environment, text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if env.stderr_color else text


def print_error(env: Environment, error: LocalchatError) -> None:
    """One line on stderr: what went wrong, then what to do."""
    message = _style(env, "error:", "1;31") + f" {error.message}"
    if error.hint:
        message += f" ({error.hint})"
    print(message, file=env.stderr)


def confirm(env: Environment, question: str) -> bool:
    """Ask a yes/no question on stderr and read the answer from stdin; Enter means yes.

    Ctrl-C or Ctrl-D (the end of input) at the question is a KeyboardInterrupt.
    """
    while True:
        env.stderr.write(f"{question} [Y/n]: ")
        env.stderr.flush()
        answer = env.stdin.readline()
        if not answer:
            env.stderr.write("\n")
            raise KeyboardInterrupt
        answer = answer.strip().lower()
        if answer in ("", "y", "yes"):
            return True
        if answer in ("n", "no"):
            return False


def print_note(env: Environment, text: str) -> None:
    """An informational line on stderr, dimmed on a terminal."""
    print(_style(env, text, "2"), file=env.stderr)


def format_rate(value: float | None) -> str:
    """Tokens per second, or a dash when there was too little to time."""
    return f"{value:,.1f} tok/s" if value else "- tok/s"


def format_stats(load: EngineInfo | None, stats: GenerationStats) -> str:
    """The one-line timing summary `--verbose` prints after a reply."""
    parts = []
    if load is not None:
        parts.append(f"load {load.load_s:.2f} s")
    parts += [
        f"first token {stats.ttft_s * 1000:.0f} ms",
        f"prompt {stats.prompt_tokens} tok ({stats.cached_tokens} cached), "
        f"prefill {format_rate(stats.prefill_tokens_per_s)}",
        f"reply {stats.completion_tokens} tok"
        + (f" ({stats.reasoning_tokens} thinking)" if stats.reasoning_tokens else "")
        + f", decode {format_rate(stats.decode_tokens_per_s)}",
    ]
    drafts = format_drafts(stats)
    if drafts:
        parts.append(f"drafts {drafts}")
    parts.append(f"finish {stats.finish_reason}")
    if stats.tokens_estimated:
        parts.append("token counts estimated (the server sent none)")
    return " · ".join(parts)


def format_drafts(stats: GenerationStats) -> str:
    """Drafting in words ("84% of 120 accepted, 3.2 tok/step"), or "" when nothing was drafted."""
    acceptance, per_step = stats.draft_acceptance, stats.tokens_per_verify_step
    if acceptance is None or per_step is None:
        return ""
    return f"{acceptance:.0%} of {stats.draft_tokens} accepted, {per_step:.1f} tok/step"


def stats_record(text: str, load: EngineInfo | None, stats: GenerationStats,
                 model: str, reasoning: str = "") -> dict[str, Any]:
    """The `--json` object for one reply: the answer, the thinking apart, finish reason, token
    counts (completion_tokens counts both parts), timings."""
    return {
        "model": model,
        "text": text,
        "reasoning": reasoning,
        "finish_reason": stats.finish_reason,
        "prompt_tokens": stats.prompt_tokens,
        "cached_prompt_tokens": stats.cached_tokens,
        "completion_tokens": stats.completion_tokens,
        "tokens_estimated": stats.tokens_estimated,  # True only when a server sent no usage
        "reasoning_tokens": stats.reasoning_tokens,
        "load_s": round(load.load_s, 4) if load is not None else None,
        "ttft_s": round(stats.ttft_s, 4),
        "prefill_s": round(stats.prefill_s, 4),
        "decode_s": round(stats.decode_s, 4),
        "prefill_tokens_per_s": _round(stats.prefill_tokens_per_s),
        "decode_tokens_per_s": _round(stats.decode_tokens_per_s),
        "draft_tokens": stats.draft_tokens,
        "draft_accepted": stats.draft_accepted,
        "draft_acceptance": _round(stats.draft_acceptance, 3),
        "tokens_per_verify_step": _round(stats.tokens_per_verify_step),
        "n_ctx": load.n_ctx if load is not None else None,
        "threads": load.threads if load is not None else None,
        "backend": load.backend if load is not None else None,
        "chat_format": load.chat_format if load is not None else None,
        "flash_attn": getattr(load, "flash_attn", None),
        "cache_type": getattr(load, "cache_type", None),
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


def context_note(info: EngineInfo, stats: GenerationStats) -> str:
    """Why a reply stopped short without -n: the context window is full."""
    from localchat.engine.options import context_hint

    hint = context_hint(info.n_ctx, getattr(info, "n_ctx_train", None), "shorten the input")
    return (f"note: the reply stopped at the end of the {info.n_ctx}-token context window "
            f"(prompt {stats.prompt_tokens} + reply {stats.completion_tokens} tokens); {hint}")


def print_json(env: Environment, record: dict[str, Any]) -> None:
    """One JSON object on one line of stdout."""
    env.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    env.stdout.flush()


def stderr_is_terminal(env: Environment) -> bool:
    """True when a person watches stderr (progress bars, questions)."""
    return _isatty(env.stderr)


@contextmanager
def download_progress(env: Environment, label: str
                      ) -> Iterator[tuple[Callable[[int, int], None], Callable[[str], None]]]:
    """(progress, status) callbacks for a pull: a rich bar on a terminal, quiet in a pipe."""

    def status(note: str) -> None:
        print_note(env, note)

    if not stderr_is_terminal(env):
        yield (lambda done, total: None), status
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(file=env.stderr, no_color=bool(os.environ.get("NO_COLOR")))
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        def live_status(note: str) -> None:
            bar.console.print(note, style="dim", highlight=False)

        yield progress, live_status


def format_bytes(size: int | float) -> str:
    """1.2 GB, 98.4 MB, 512 B: decimal units, as disks and downloads are sold."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def format_count(count: int | None) -> str:
    """135M, 1.5B: parameter counts the way model cards write them."""
    if not count:
        return "-"
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f}".rstrip("0").rstrip(".") + suffix
    return str(count)


def print_table(env: Environment, headers: Sequence[str], rows: Sequence[Sequence[Cell]],
                fit: tuple[str, ...] = ()) -> None:
    """Aligned columns: bold headers on a terminal, plain text in a pipe.

    On a terminal every cell is made safe and one line (`terminal_safe`), emphasised runs are
    bold, and the table is fitted to the terminal's width by cutting the widest of the `fit`
    columns (free text: names, messages, paths) with an ellipsis. In a pipe cells are whole.
    """
    from rich.cells import cell_len

    terminal = _isatty(env.stdout)
    styled = terminal and not os.environ.get("NO_COLOR")
    table = [[_runs(cell, terminal) for cell in row] for row in [headers, *rows]]
    widths = [max(sum(cell_len(text) for text, _ in cell) for cell in column)
              for column in zip(*table, strict=True)]
    if terminal:
        free = [index for index, header in enumerate(headers) if header in fit]
        widths = table_cells.fitted(widths, free, [cell_len(header) for header in headers],
                         terminal_columns(env))
    for number, row in enumerate(table):
        line = "  ".join(table_cells.cut(cell, width, styled)
                         for cell, width in zip(row, widths, strict=True)).rstrip()
        print(f"\x1b[1m{line}\x1b[0m" if number == 0 and styled else line, file=env.stdout)


def terminal_columns(env: Environment) -> int:
    """The width of the terminal on stdout (COLUMNS overrides it, as in shutil)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        size = os.get_terminal_size(env.stdout.fileno()).columns
    except (AttributeError, ValueError, OSError):
        size = 0
    return size if size > 0 else 80


def _runs(cell: Cell, terminal: bool) -> tuple[tuple[str, bool], ...]:
    runs = ((cell, False),) if isinstance(cell, str) else cell
    return tuple((terminal_safe(text, keep="") if terminal else text, bold)
                 for text, bold in runs)


def model_label(model: str) -> str:
    """A model as a table shows it: a .gguf path by its file name; names as they are."""
    if model.lower().endswith(".gguf"):
        return model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return model


def terminal_safe(text: str, keep: str = "\n\t") -> str:
    """`text` with control and invisible format characters shown as escapes (\\x1b, \\u202e).

    For text that comes from a model file: a stranger's escape sequences must not reach the
    terminal (they can retitle windows, hide text or write to the clipboard). Characters in
    `keep` pass as they are; keep="" escapes line breaks too, for one-line messages.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode()
                   for c in text)


def print_fields(env: Environment, fields: list[tuple[str, str]]) -> None:
    """`key  value` lines, keys aligned; values are made terminal-safe."""
    width = max(len(key) for key, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {terminal_safe(value)}", file=env.stdout)


def model_fields(ref: ModelRef, info: ModelInfo, memory: MemoryEstimate, n_ctx: int,
                 available: int | None, thinking: Thinking | None = None
                 ) -> list[tuple[str, str]]:
    """What `localchat show` prints: identity, shape, and whether it fits in memory."""
    spec = getattr(ref, "spec", None)
    fields = [("name", ref.name), ("path", str(info.path)),
              ("file size", format_bytes(info.file_size))]
    if spec is not None and spec.description:
        fields.append(("description", spec.description))
    fields += [
        ("architecture", info.architecture or "-"),
        ("parameters", format_count(info.parameter_count)),
        ("quantization", info.quantization or "-"),
        ("layers", str(info.block_count or "-")),
        ("trained context", f"{info.context_length:,}" if info.context_length else "-"),
        ("license", info.license or (spec.license if spec else None) or "-"),
        ("chat template", "in the file" if info.chat_template else "none (chosen at load)"),
        ("thinks", thinking.describe() if thinking else "no"),
    ]
    need = f"{format_bytes(memory.total_bytes)} at ctx {n_ctx:,} (weights " \
           f"{format_bytes(memory.weights_bytes)} + {memory.kv_cache_type} KV cache " \
           f"{format_bytes(memory.kv_cache_bytes)})"
    if available is not None:
        verdict = "fits" if memory.total_bytes < available else "does NOT fit"
        need += f"; {format_bytes(available)} available now: {verdict}"
    fields.append(("memory", need))
    return fields


def model_record(ref: ModelRef, info: ModelInfo, memory: MemoryEstimate, n_ctx: int,
                 available: int | None, thinking: Thinking | None = None) -> dict[str, Any]:
    """What `localchat show --json` prints: the same facts as `model_fields`, as data."""
    spec = getattr(ref, "spec", None)
    return {
        "name": ref.name, "path": str(info.path), "file_size": info.file_size,
        "description": spec.description if spec is not None else None,
        "architecture": info.architecture, "parameters": info.parameter_count,
        "quantization": info.quantization, "layers": info.block_count,
        "context_length": info.context_length, "gguf_version": info.gguf_version,
        "license": info.license or (spec.license if spec is not None else None),
        "memory": {
            "n_ctx": n_ctx, "weights_bytes": memory.weights_bytes,
            "kv_cache_bytes": memory.kv_cache_bytes, "kv_cache_type": memory.kv_cache_type,
            "total_bytes": memory.total_bytes,
            "kv_cache_known": memory.kv_cache_known, "available_bytes": available,
            "fits": memory.total_bytes < available if available is not None else None,
        },
        "chat_template": info.chat_template,
        "thinking": None if thinking is None else {
            "open": thinking.family.open, "close": thinking.family.close,
            "source": thinking.source, "switch": thinking.switch,
            "opened_by_prompt": thinking.opened_by_prompt},
    }


# ---- history: `localchat history` listings and transcripts ----------------------------------


def format_when(moment: datetime) -> str:
    """A stored UTC datetime as local `YYYY-MM-DD HH:MM`."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def print_transcript(env: Environment, messages: Sequence[MessageRecord]) -> None:
    """Each message as a role line (bold on a terminal) and its text, a blank line between.

    On a terminal the text is made safe (`terminal_safe`): it came from a person or a model.
    """
    terminal = _isatty(env.stdout)
    bold = terminal and not os.environ.get("NO_COLOR")
    for message in messages:
        label = f"{message.role}:" + (" (interrupted)" if message.interrupted else "")
        print(f"\x1b[1m{label}\x1b[0m" if bold else label, file=env.stdout)
        if message.reasoning:
            thought = "\n".join(f"  | {line}".rstrip() for line in
                                message.reasoning.rstrip("\n").splitlines())
            thought = f"  (thinking)\n{terminal_safe(thought) if terminal else thought}"
            print(f"\x1b[2m{thought}\x1b[0m" if bold else thought, file=env.stdout)
        text = message.content.rstrip("\n")
        print(terminal_safe(text) if terminal else text, end="\n\n", file=env.stdout)
