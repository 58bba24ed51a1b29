"""The `localchat` command: parse options, call the core, hand results to `render`.

This is the one place where a `LocalchatError` becomes a message and an exit code. Heavy
libraries (llama_cpp, huggingface_hub) are imported only inside the commands that use them,
so `localchat --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from localchat import __version__
from localchat.errors import ExitStatus, LocalchatError, UsageError
from localchat.render import Environment

app = typer.Typer(
    name="localchat",
    help="Chat with quantized GGUF models on your own computer, through llama.cpp.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_MODEL = "smollm2"


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        from localchat.backend import compiled_backend

        try:
            binding = metadata.version("llama-cpp-python")
        except metadata.PackageNotFoundError:
            binding = "not installed"
        typer.echo(f"localchat {__version__}")
        typer.echo(f"llama-cpp-python {binding} (llama.cpp backend: {compiled_backend()})")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show versions and the compiled backend.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Chat with quantized GGUF models on your own computer."""


def resolve_model_path(name: str) -> Path:
    """Turn a MODEL argument into a local GGUF path (the catalog extends this)."""
    path = Path(name).expanduser()
    if path.exists() or name.endswith(".gguf") or os.sep in name:
        return path
    raise UsageError(f"unknown model '{name}'", "give the path to a .gguf file")


@app.command()
def run(
    model: Annotated[str | None, typer.Argument(help="A .gguf file path.")] = None,
    prompt: Annotated[str | None,
                      typer.Argument(help="The prompt; piped stdin comes first.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy. [default: 0.8]")] = None,
    top_p: Annotated[float | None, typer.Option(help="[default: 0.95]")] = None,
    top_k: Annotated[int | None, typer.Option(help="0 = off. [default: 40]")] = None,
    min_p: Annotated[float | None, typer.Option(help="[default: 0.05]")] = None,
    repeat_penalty: Annotated[float | None, typer.Option(help="1 = off. [default: 1.0]")] = None,
    seed: Annotated[int | None, typer.Option(help="Fix the random seed.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n",
                                                   help="Stop after N tokens.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this text (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past end-of-turn.")] = False,
    ctx: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    threads: Annotated[int | None, typer.Option(help="[default: physical cores]")] = None,
    gpu_layers: Annotated[int | None, typer.Option(help="[default: all, with a GPU]")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Force CPU only.")] = False,
    mmap: Annotated[bool | None, typer.Option("--mmap/--no-mmap", help="[default: mmap]")] = None,
    mlock: Annotated[bool, typer.Option(help="Lock the weights in RAM.")] = False,
    chat_format: Annotated[str | None, typer.Option(help="Override the chat template.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Timings and llama.cpp logs on stderr.")] = False,
) -> None:
    """Run a model on PROMPT (and piped stdin) and stream the reply."""
    from localchat import oneshot
    from localchat.config import load_config

    env = Environment()
    config = load_config()
    model_name = model or config.model or DEFAULT_MODEL
    request = oneshot.Request(
        model=model_name, prompt=prompt, system=system if system is not None else config.system,
        sampling=oneshot.sampling_from(config, temperature=temperature, top_p=top_p,
                                       top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                                       seed=seed, max_tokens=max_tokens,
                                       stop=tuple(stop or ()), ignore_eos=ignore_eos),
        engine=oneshot.engine_options_from(config, resolve_model_path(model_name), ctx=ctx,
                                           threads=threads, gpu_layers=gpu_layers, cpu=cpu,
                                           mmap=mmap, mlock=mlock, chat_format=chat_format,
                                           verbose=verbose),
        json_output=json_output, verbose=verbose,
    )
    raise typer.Exit(oneshot.run_once(request, env))


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LOCALCHAT_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every failure to one line and an exit code."""
    click = _click_exceptions()
    argv = list(sys.argv[1:] if argv is None else argv)
    env = Environment()
    debug = _debug_requested(argv)
    try:
        result: Any = typer.main.get_command(app).main(
            args=argv, prog_name="localchat", standalone_mode=False
        )
        code = result if isinstance(result, int) else ExitStatus.OK
    except typer.Exit as exc:
        code = exc.exit_code
    except click.NoArgsIsHelpError:
        code = ExitStatus.OK  # bare `localchat` printed the help; that is what was asked
    except click.UsageError as exc:
        if debug:
            raise
        from localchat.render import print_error

        command = exc.ctx.command_path if exc.ctx else "localchat"
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
    except LocalchatError as exc:
        if debug:
            raise
        from localchat.render import print_error

        print_error(env, exc)
        code = exc.exit_status
    except (OSError, MemoryError) as exc:
        if debug:
            raise
        from localchat.render import print_error

        print_error(env, LocalchatError(str(exc), "run with --debug for the traceback"))
        code = ExitStatus.ERROR
    sys.exit(int(code))


def _click_exceptions() -> Any:
    """typer >= 0.29 carries its own copy of click; older ones use click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _silence_stdout() -> None:
    """After the reader of a pipe has gone, make the interpreter's final flush quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
