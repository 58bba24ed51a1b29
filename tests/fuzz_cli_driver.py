"""Run `localchat show` and `localchat run` on many malformed GGUF files, each in its own process.

Usage: python tests/fuzz_cli_driver.py SPEC.json  (prints one JSON line per command run)

SPEC: {"base": path of a valid GGUF, "header_bytes": how much of it the variants rewrite (0 =
all), "seed": int, "flips": int, "work": a scratch folder, "commands": [["show"], ["run", ...]]}

This driver imports the CLI and the modules `show` and `run` use once, then forks a child per
command (a fresh interpreter per run would cost ~0.3 s each); the child calls
`localchat.cli.main` exactly as the console script does, with stdout and stderr captured to
files. A segfault, an abort or a hang in llama.cpp kills only the child, and shows here as a
signal or a timeout. The driver itself never imports llama_cpp, so every child starts from the
same state as a real `localchat` process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localchat import cli
from tests.gguf_factory import malformed_variants

TIMEOUT_S = 30.0


def warm_up(valid_file: Path, scratch: Path) -> None:
    """Import what `show` and `run` import lazily (typer's pydantic adapters, the catalog...)
    by showing the valid file once in this process, so each child pays only for its own work."""
    from localchat import oneshot  # noqa: F401 - run's modules, not llama_cpp

    saved = os.dup(1), os.dup(2)
    code = None
    try:
        with (scratch / "warm-up").open("w") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                cli.main(["show", str(valid_file)])
            except SystemExit as exit_:
                code = exit_.code
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        for fd, saved_fd in zip((1, 2), saved, strict=True):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
    assert code == 0, "the valid file must show"


def run_child(argv: list[str], out: Path, err: Path) -> tuple[int | None, int | None, float]:
    """(exit code, killing signal, seconds) of `localchat ARGV` in a forked child."""
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: become `localchat ARGV`
        code = 70
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
            # Fresh streams on fds 0-2: the parent's may be replaced (pytest's capture).
            sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives until os._exit
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives until os._exit
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # shown like the interpreter would, then exit
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = started + TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            elapsed = time.monotonic() - started
            if os.WIFSIGNALED(status):
                return None, os.WTERMSIG(status), elapsed
            return os.WEXITSTATUS(status), None, elapsed
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, None, TIMEOUT_S
        time.sleep(0.002)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    base_path, work = Path(spec["base"]), Path(spec["work"])
    warm_up(base_path, work)
    size = base_path.stat().st_size
    with base_path.open("rb") as source:
        base = source.read(spec["header_bytes"] or size)
    variant_path, out, err = work / "variant.gguf", work / "stdout", work / "stderr"
    for variant in malformed_variants(base, size, seed=spec["seed"], flips=spec["flips"]):
        with variant_path.open("wb") as file:
            file.write(variant.data[: variant.size])
        os.truncate(variant_path, variant.size)  # sparse up to the real size: no 98 MB writes
        for command in spec["commands"]:
            argv = [command[0], str(variant_path), *command[1:]]
            code, killed_by, seconds = run_child(argv, out, err)
            print(json.dumps({
                "label": variant.label, "must_refuse": variant.must_refuse, "command": command[0],
                "code": code, "signal": killed_by, "seconds": round(seconds, 3),
                "stdout": out.read_text(errors="replace")[-2000:],
                "stderr": err.read_text(errors="replace")[-2000:],
            }), flush=True)


if __name__ == "__main__":
    main()
