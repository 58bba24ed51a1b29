"""Run the `localchat` command in-process, as httpie's tests do: argv and stdin in, exit code and
captured stdout and stderr out. Much faster than a subprocess, and a failure shows its traceback.

Keep subprocess and pseudo-terminal tests for what only a real process shows: the console
script, signals and Ctrl-C, terminal output.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from localchat import cli
from localchat.render import Environment


@dataclass(frozen=True)
class CliResult:
    """What a run of the command left behind."""

    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str, stdin: str | bytes = "",
            env: Mapping[str, str | None] | None = None) -> CliResult:
    """`localchat ARGS` with `stdin` piped in; `env` sets (or, with None, unsets) variables."""
    raw = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    stdin_stream = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")
    stdout, stderr = io.StringIO(), io.StringIO()
    with _environ(env or {}), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            cli.main(list(args), Environment(stdin=stdin_stream, stdout=stdout, stderr=stderr))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def _environ(changes: Mapping[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
