"""The `localchat` command: parse options, call the core, hand results to `render`.

This is the one place where a `LocalchatError` becomes a message and an exit code. Heavy
libraries (llama_cpp, huggingface_hub) are imported only inside the commands that use them,
so `localchat --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from localchat import __version__, render
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


def _complete_model(incomplete: str) -> list[str]:
    """Shell completion for MODEL: catalog names and tags, and models on disk."""
    try:
        from localchat.catalog import completion_names
        from localchat.store import list_local_models

        names = completion_names() + [model.name for model in list_local_models()]
    except LocalchatError:
        return []
    return sorted({name for name in names if name.startswith(incomplete)})


def ensure_local(ref: Any, *, offline: bool = False, env: Environment | None = None) -> Path:
    """The one way a resolved model becomes a file on disk: pull it when missing.

    A person at a terminal is asked before a download starts; scripts just get the download.
    """
    if ref.kind == "path":
        return ref.path
    from localchat import store

    env = env or Environment()
    path = store.find_local_model(ref)
    if path is not None:
        return path
    if not offline and env.stdin_isatty and render.stderr_is_terminal(env) \
            and not typer.confirm(f"{ref.name} is not on disk. Download it now?", default=True,
                                  err=True):
        raise typer.Exit(ExitStatus.ERROR)
    return _pull(ref, offline, env)


def resolve_model_path(name: str, offline: bool = False) -> Path:
    """A MODEL argument (catalog name, owner/repo:QUANT or path) to a file on disk."""
    from localchat.catalog import resolve_model

    return ensure_local(resolve_model(name), offline=offline)


def _pull(ref: Any, offline: bool, env: Environment) -> Path:
    from localchat import store

    with render.download_progress(env, ref.name) as (progress, status):
        return store.pull_model(ref, progress=progress, status=status, offline=offline)


ModelArgument = Annotated[str, typer.Argument(help="Catalog name[:tag], owner/repo:QUANT, or "
                                              "a .gguf path.", autocompletion=_complete_model)]
OfflineOption = Annotated[bool, typer.Option("--offline", help="Never touch the network.")]


@app.command()
def run(
    model: Annotated[str | None, typer.Argument(
        help="Catalog name[:tag], owner/repo:QUANT, or a .gguf path. [default: smollm2]",
        autocompletion=_complete_model)] = None,
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
    offline: OfflineOption = False,
) -> None:
    """Run a model on PROMPT (and piped stdin) and stream the reply; pulls it if missing."""
    from localchat import oneshot
    from localchat.catalog import resolve_model
    from localchat.config import load_config

    env = Environment()
    config = load_config()
    ref = resolve_model(model or config.model or DEFAULT_MODEL)
    sampling = oneshot.sampling_from(config, ref.defaults, temperature=temperature, top_p=top_p,
                                     top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                                     seed=seed, max_tokens=max_tokens, stop=tuple(stop or ()),
                                     ignore_eos=ignore_eos)
    request = oneshot.Request(
        model=ref.name, prompt=prompt, system=system if system is not None else config.system,
        sampling=sampling,
        engine=oneshot.engine_options_from(config, ref.defaults, Path(ref.name), ctx=ctx,
                                           threads=threads, gpu_layers=gpu_layers, cpu=cpu,
                                           mmap=mmap, mlock=mlock, chat_format=chat_format,
                                           verbose=verbose),
        json_output=json_output, verbose=verbose,
    )  # every flag is validated above, before a download can start
    path = ensure_local(ref, offline=offline, env=env)
    request = replace(request, engine=replace(request.engine, model_path=path))
    raise typer.Exit(oneshot.run_once(request, env))


@app.command()
def bench(
    model: Annotated[str | None, typer.Argument(help="As for run. [default: smollm2]",
                                                autocompletion=_complete_model)] = None,
    prompt_tokens: Annotated[int, typer.Option("-p", help="Prompt size in tokens.")] = 512,
    gen_tokens: Annotated[int, typer.Option("-n", help="Tokens to generate.")] = 128,
    repetitions: Annotated[int, typer.Option(help="Measured runs after a warm-up.")] = 5,
    threads: Annotated[int | None, typer.Option(help="[default: physical cores]")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    offline: OfflineOption = False,
) -> None:
    """Measure prefill and decode speed, first-token latency, load time and memory."""
    from contextlib import nullcontext

    from localchat import bench as benchmark
    from localchat import oneshot
    from localchat.catalog import resolve_model
    from localchat.config import load_config

    env, config = Environment(), load_config()
    settings = benchmark.BenchSettings(prompt_tokens, gen_tokens, repetitions)
    settings.validate()  # before a download can start, like every flag
    ref = resolve_model(model or config.model or DEFAULT_MODEL)
    options = oneshot.engine_options_from(config, ref.defaults, Path(ref.name), ctx=ctx,
                                          threads=threads, gpu_layers=None, cpu=False, mmap=None,
                                          mlock=False, chat_format=None, verbose=False)
    options = replace(options, model_path=ensure_local(ref, offline=offline, env=env))
    bar = None
    if render.stderr_is_terminal(env):
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(file=env.stderr), transient=True)
        task = bar.add_task("bench", total=None)
    with bar or nullcontext():
        result = benchmark.run_benchmark(settings, options, bar and (
            lambda what, done, total: bar.update(task, description=what, completed=done,
                                                 total=total)))
    record = benchmark.bench_record(result)
    if json_output:
        render.print_json(env, record)
    else:
        render.print_table(env, ["figure", "median", "spread"],
                           [list(row) for row in benchmark.summary_rows(record)])
    if result.interrupted:
        render.print_note(env, "interrupted: the figures above are what was measured so far")
    raise typer.Exit(ExitStatus.INTERRUPTED if result.interrupted else ExitStatus.OK)


@app.command()
def pull(model: ModelArgument, offline: OfflineOption = False) -> None:
    """Download a model into the Hugging Face cache (resumes, verifies sha256)."""
    from localchat import store
    from localchat.catalog import resolve_model

    env = Environment()
    ref = resolve_model(model, allow_path=False)
    already = store.find_local_model(ref)
    path = already or _pull(ref, offline, env)
    render.print_note(env, f"{ref.name} {'is already' if already else 'is'} at {path}")


@app.command("list")
def list_models(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Models on disk: catalog models and any other GGUF in the Hugging Face cache."""
    from localchat import store

    env = Environment()
    models = store.list_local_models()
    records = [{**asdict(m), "path": str(m.path), "context_length": _trained_context(m.path)}
               for m in models]
    if json_output:
        render.print_json(env, {"models": records})
    elif not records:
        render.print_note(env, "no models on disk yet: try `localchat pull smollm2`")
    else:
        render.print_table(env, ["NAME", "QUANT", "SIZE", "PARAMS", "CONTEXT", "WHERE"], [
            [r["name"], r["quant"] or "-", render.format_bytes(r["size_bytes"]),
             r["parameters"] or "-", str(r["context_length"] or "-"), r["path"]]
            for r in records])


def _trained_context(path: Path) -> int | None:
    from localchat.modelfile import read_model_file

    try:
        return read_model_file(path).context_length
    except LocalchatError:
        return None


@app.command()
def show(
    model: ModelArgument,
    ctx: Annotated[int | None, typer.Option(help="Context size for the memory estimate.")] = None,
) -> None:
    """A model's metadata, chat template and memory needs, without loading the weights."""
    from localchat import store
    from localchat.backend import available_memory_bytes
    from localchat.catalog import resolve_model
    from localchat.modelfile import estimate_memory, read_model_file

    env = Environment()
    ref = resolve_model(model)
    path = store.find_local_model(ref) if ref.kind != "path" else ref.path
    if path is None:
        raise LocalchatError(f"{ref.name} is not on disk", f"localchat pull {ref.name}")
    info = read_model_file(path)
    n_ctx = ctx or ref.defaults.ctx or min(info.context_length or 4096, 4096)
    if n_ctx < 1:
        raise UsageError(f"--ctx must be at least 1 (got {n_ctx})")
    render.print_fields(env, render.model_fields(ref, info, estimate_memory(info, n_ctx),
                                                 n_ctx, available_memory_bytes()))
    if info.chat_template:
        print(f"\nchat template:\n{info.chat_template}", file=env.stdout)


@app.command()
def rm(model: ModelArgument) -> None:
    """Delete a downloaded model (other tools' files in the cache are left alone)."""
    from localchat import store
    from localchat.catalog import resolve_model

    env = Environment()
    freed = store.remove_model(resolve_model(model, allow_path=False))
    render.print_note(env, f"removed {model} ({render.format_bytes(freed)} freed)")


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
