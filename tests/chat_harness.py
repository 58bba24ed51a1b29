"""The chat driven through prompt-toolkit's pipe input: type keys, read what it printed.

Shared by the REPL tests (test_repl, test_repl_files, test_thinking_chat); the engine fixtures
(`smollm2_engine`, `fresh_smollm2`) are in conftest.py.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from localchat.chat.repl import run_repl
from localchat.chat.session import ReplOptions
from localchat.engine.protocol import Sampling
from localchat.oneshot import Request
from localchat.render import Environment

# Greedy and short.
GREEDY = Sampling(temperature=0.0, max_tokens=8)


@dataclass(frozen=True)
class Transcript:
    status: int
    stdout: str
    stderr: str


class TerminalText(io.StringIO):
    """stdout that says it is a terminal, so the REPL renders markdown into it."""

    def isatty(self) -> bool:
        return True


def chat(engine, keys: str | bytes, *, history: bool = True, options: ReplOptions | None = None,
         sampling: Sampling = GREEDY, system: str | None = None, stdout: io.StringIO | None = None,
         verbose: bool = False) -> Transcript:
    """Run the REPL on `keys`, then Ctrl-D (the pipe closes); return what it printed."""
    env = Environment(stdin=io.StringIO(), stdout=stdout or io.StringIO(), stderr=io.StringIO())
    request = Request(model="smollm2", prompt=None, system=system, sampling=sampling,
                      engine=engine.options, verbose=verbose, history=history)
    with create_pipe_input() as pipe:

        def type_keys() -> None:  # in a thread: a long paste would fill the pipe and block
            pipe.send_bytes(keys if isinstance(keys, bytes) else keys.encode())
            pipe.close()

        typist = threading.Thread(target=type_keys, daemon=True)
        typist.start()
        try:
            status = run_repl(request, env, options or ReplOptions(markdown=False),
                              engine=engine, pt_input=pipe, pt_output=DummyOutput())
        finally:
            typist.join(timeout=10)
    return Transcript(status, env.stdout.getvalue(), env.stderr.getvalue())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]
