"""The `localchat` command: the app, its commands (one module each in commands/), and `main`,
the one place where a failure becomes one line and an exit code.

Heavy libraries (llama_cpp, huggingface_hub, numpy) are imported only inside the commands that
use them, so `localchat --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Annotated

import typer

from localchat import __version__
from localchat.commands import bench, history, models, run, serve
from localchat.commands.options import SOURCES, env_of
from localchat.errors import ExitStatus, LocalchatError, UsageError
from localchat.render import Environment, print_error

app = typer.Typer(
    name="localchat",
    help="Chat with quantized GGUF models on your own computer, through llama.cpp.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text as written: "[remote]" and "[default: ...]" stay
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(context: typer.Context, value: bool) -> None:
    if value:
        from importlib import metadata

        from localchat.engine.runtime import compiled_backend

        try:
            binding = metadata.version("llama-cpp-python")
        except metadata.PackageNotFoundError:
            binding = "not installed"
        print(f"localchat {__version__}\nllama-cpp-python {binding} (llama.cpp backend: "
              f"{compiled_backend()})", file=env_of(context).stdout)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show versions and the compiled backend.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Chat with quantized GGUF models on your own computer."""


# The commands, in the order `localchat --help` lists them.
app.command(epilog=SOURCES)(run.run)
app.command(epilog=SOURCES)(serve.serve)
app.command(epilog=SOURCES)(bench.bench)
app.command()(models.pull)
app.command("list")(models.list_models)
app.command()(models.show)
app.command()(models.rm)
app.add_typer(history.app, name="history")


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LOCALCHAT_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None, env: Environment | None = None) -> None:
    """Entry point: run the app and map every failure to one line and an exit code.

    `env` (the streams and terminal facts) is passed down to every command through click's
    context object; tests call `main(argv, env)` in-process with their own.
    """
    click = _click_exceptions()
    argv = list(sys.argv[1:] if argv is None else argv)
    env = env or Environment()
    debug = _debug_requested(argv)
    try:
        code = _invoke(argv, env)
    except typer.Exit as exc:
        code = exc.exit_code
    except click.NoArgsIsHelpError:
        code = ExitStatus.OK  # bare `localchat` printed the help; that is what was asked
    except click.UsageError as exc:
        if debug:
            raise
        command = exc.ctx.command_path if exc.ctx else _command_path(argv)
        print_error(env, UsageError(exc.format_message(), f"see `{command} --help`"))
        code = ExitStatus.USAGE
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        code = ExitStatus.INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        code = ExitStatus.OK
    except SystemExit as exc:  # rich meets a closed pipe with exit 1; the reader just left early
        if not isinstance(exc.__context__, BrokenPipeError):
            raise
        _silence_stdout()
        code = ExitStatus.OK
    except LocalchatError as exc:
        if debug:
            raise
        print_error(env, exc)
        code = exc.exit_status
    except (OSError, MemoryError) as exc:
        if debug:
            raise
        from localchat.errors import disk_full_error
        full = isinstance(exc, OSError) and disk_full_error(exc, exc.filename,
                                                            "free some space, then try again")
        print_error(env, full or LocalchatError(str(exc), "run with --debug for the traceback"))
        code = ExitStatus.ERROR
    except Exception as exc:  # a bug: one line, not a traceback, unless asked for
        if debug:
            raise
        detail = " ".join(str(exc).split())
        print_error(env, LocalchatError(
            f"unexpected {type(exc).__name__}" + (f": {detail}" if detail else ""),
            "a bug: run with --debug for the traceback"))
        code = ExitStatus.ERROR
    sys.exit(int(code))


def _invoke(argv: list[str], env: Environment) -> int:
    """Parse and run one command, letting every exception reach `main`'s handler.

    Click's own `main` turns a broken pipe into exit 1 before we see it (`| head -1` would fail a
    `set -o pipefail` script), so we do what it does without its exception handling.
    """
    command = typer.main.get_command(app)
    command._main_shell_completion({}, "localchat", None)  # exits when a shell asks to complete
    with command.make_context("localchat", argv, obj=env) as context:
        result = command.invoke(context)
    return result if isinstance(result, int) else ExitStatus.OK


def _command_path(argv: list[str]) -> str:
    """`localchat run` for an error click raised before it made the command's context."""
    group, names = typer.main.get_command(app), ["localchat"]
    for word in argv:
        sub = getattr(group, "commands", {}).get(word)
        if sub is None and not word.startswith("-"):
            break
        if sub is not None:
            group, names = sub, [*names, word]
    return " ".join(names)


def _click_exceptions() -> ModuleType:
    """typer >= 0.29 carries its own copy of click; older ones use click itself."""
    try:
        return importlib.import_module("typer._click.exceptions")
    except ImportError:
        return importlib.import_module("click.exceptions")


def _silence_stdout() -> None:
    """After the reader of a pipe has gone, make the interpreter's final flush quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
