"""The `localchat` command: parse options, call the core, hand results to `render`.

This is the one place where a `LocalchatError` becomes a message and an exit code. Heavy
libraries (llama_cpp, huggingface_hub) are imported only inside the commands that use them,
so `localchat --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
    Offline (`--offline` or HF_HUB_OFFLINE) there is nothing to ask: a missing model is an error.
    Every way this fails is a LocalchatError (Ctrl-C at the question is a KeyboardInterrupt), so
    the chat's /model can keep its current model.
    """
    if ref.kind == "path":
        return ref.path
    from localchat import store

    env = env or Environment()
    path = store.find_local_model(ref)
    if path is not None:
        return path
    if not store.offline_mode(offline) and env.stdin_isatty and render.stderr_is_terminal(env):
        try:
            wanted = typer.confirm(f"{ref.name} is not on disk. Download it now?", default=True,
                                   err=True)
        except typer.Abort:  # Ctrl-C or Ctrl-D at the question
            raise KeyboardInterrupt from None
        if not wanted:
            raise LocalchatError(f"{ref.name} is not on disk and was not downloaded",
                                 f"`localchat pull {ref.name}` fetches it")
    return _pull(ref, offline, env)


def resolve_model_path(name: str, offline: bool = False) -> Path:
    """A MODEL argument (catalog name, owner/repo:QUANT or path) to a file on disk."""
    from localchat.catalog import resolve_model

    return ensure_local(resolve_model(name), offline=offline)


def _pull(ref: Any, offline: bool, env: Environment) -> Path:
    from localchat import store

    if store.offline_mode(offline):  # no progress bar for a download that cannot start
        return store.pull_model(ref, offline=True)
    with render.download_progress(env, ref.name) as (progress, status):
        return store.pull_model(ref, progress=progress, status=status, offline=offline)


ModelArgument = Annotated[str, typer.Argument(help="Catalog name[:tag], owner/repo:QUANT, or "
                                              "a .gguf path.", autocompletion=_complete_model)]
OfflineOption = Annotated[bool, typer.Option("--offline", help="Never touch the network.")]
FlashAttnOption = Annotated[bool | None, typer.Option(
    "--flash-attn/--no-flash-attn", help="llama.cpp's flash attention. [default: on]")]


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
    flash_attn: FlashAttnOption = None,
    chat_format: Annotated[str | None, typer.Option(help="Override the chat template.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Timings and llama.cpp logs on stderr.")] = False,
    offline: OfflineOption = False,
    endpoint: Annotated[str | None, typer.Option(
        help="Use the OpenAI-compatible server at URL; MODEL is then its model id.")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Key for --endpoint. [default: $LOCALCHAT_API_KEY]")] = None,
    no_history: Annotated[bool, typer.Option(
        "--no-history", help="Write nothing to the history. [default: config `history`]")] = False,
    session: Annotated[str | None, typer.Option(
        help="Chat in the conversation NAME: created, or resumed if it exists.")] = None,
    continue_last: Annotated[bool, typer.Option(
        "--continue", help="Chat on in the last conversation.")] = False,
    no_markdown: Annotated[bool, typer.Option(
        "--no-markdown", help="Show the chat's replies as raw text.")] = False,
    local: Annotated[bool, typer.Option(
        "--local", help="Run on this machine even when config.toml has a [remote] section.")
    ] = False,
) -> None:
    """Chat at a terminal, or stream a reply to PROMPT (and piped stdin); pulls MODEL if missing."""
    from localchat import oneshot
    from localchat.catalog import ModelDefaults, resolve_model
    from localchat.config import load_config

    env = Environment()
    config = load_config()
    interactive = prompt is None and env.stdin_isatty and not json_output
    if (session is not None or continue_last) and not interactive:
        raise UsageError("--session and --continue are for the interactive chat",
                         "leave out PROMPT and run at a terminal")
    if not local and endpoint is None and config.remote_endpoint:
        endpoint, model = config.remote_endpoint, model or config.remote_model
    ref = None if endpoint else resolve_model(model or config.model or DEFAULT_MODEL)
    sampling = oneshot.sampling_from(config, ref.defaults if ref else ModelDefaults(),
                                     temperature=temperature, top_p=top_p,
                                     top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                                     seed=seed, max_tokens=max_tokens, stop=tuple(stop or ()),
                                     ignore_eos=ignore_eos)
    common = dict(prompt=prompt, sampling=sampling, json_output=json_output, verbose=verbose,
                  system=system if system is not None else config.system,
                  history=not no_history and config.history is not False)
    load_flags = dict(ctx=ctx, threads=threads, gpu_layers=gpu_layers, cpu=cpu, mmap=mmap,
                      mlock=mlock, flash_attn=flash_attn, chat_format=chat_format,
                      verbose=verbose)
    if ref is None:  # the server owns the model: no catalog, no download
        from localchat.remote import remote_options

        request = oneshot.Request(model=model or "", engine=None,
                                  remote=remote_options(endpoint or "", model, api_key), **common)
    else:  # every flag is validated here, before a download can start
        options = oneshot.engine_options_from(config, ref.defaults, Path(ref.name), **load_flags)
        options = replace(options, model_path=ensure_local(ref, offline=offline, env=env))
        request = oneshot.Request(model=ref.name, engine=options, **common)
    if not interactive:
        raise typer.Exit(oneshot.run_once(request, env))

    def load_model(name: str) -> tuple[str, Any]:  # /model NAME in the chat
        if ref is None:
            from localchat.remote import RemoteEngine, remote_options

            return name, RemoteEngine(remote_options(endpoint or "", name, api_key))
        new = resolve_model(name)
        return new.name, oneshot.load_engine(oneshot.engine_options_from(
            config, new.defaults, ensure_local(new, offline=offline, env=env), **load_flags))

    from localchat import repl

    raise typer.Exit(repl.run_repl(request, env, repl.ReplOptions(
        markdown=not no_markdown and config.markdown is not False, session=session,
        resume_last=continue_last, load_model=load_model)))


@app.command()
def serve(
    model: Annotated[str | None, typer.Argument(help="As for run. [default: smollm2]",
                                                autocompletion=_complete_model)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for all.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8080,
    api_key: Annotated[str | None, typer.Option(
        help="Require this key. [default: $LOCALCHAT_API_KEY]")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    flash_attn: FlashAttnOption = None,
    threads: Annotated[int | None, typer.Option(help="[default: physical cores]")] = None,
    gpu_layers: Annotated[int | None, typer.Option(help="[default: all, with a GPU]")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Force CPU only.")] = False,
    chat_format: Annotated[str | None, typer.Option(help="Override the chat template.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="llama.cpp logs.")] = False,
    offline: OfflineOption = False,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions and more)."""
    from localchat import oneshot, server
    from localchat.catalog import resolve_model
    from localchat.config import load_config

    env, config = Environment(), load_config()
    ref = resolve_model(model or config.model or DEFAULT_MODEL)
    defaults = oneshot.sampling_from(config, ref.defaults, temperature=None, top_p=None, top_k=None,
                                     min_p=None, repeat_penalty=None, seed=None, max_tokens=None,
                                     stop=(), ignore_eos=False)  # what `run` would use
    settings = server.serve_settings(host, port, api_key, ref.name, defaults)
    options = oneshot.engine_options_from(config, ref.defaults, Path(ref.name), ctx=ctx,
                                          threads=threads, gpu_layers=gpu_layers, cpu=cpu,
                                          flash_attn=flash_attn, chat_format=chat_format,
                                          verbose=verbose)
    options = replace(options, model_path=ensure_local(ref, offline=offline, env=env))
    raise typer.Exit(server.serve_model(options, settings,
                                        lambda line: render.print_note(env, line)))


@app.command()
def bench(
    model: Annotated[str | None, typer.Argument(help="As for run. [default: smollm2]",
                                                autocompletion=_complete_model)] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p",
                                               help="Prompt size in tokens.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-n",
                                            help="Tokens to generate.")] = 128,
    repetitions: Annotated[int, typer.Option(help="Measured runs after a warm-up.")] = 5,
    threads: Annotated[int | None, typer.Option(help="[default: physical cores]")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    flash_attn: FlashAttnOption = None,
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
                                          threads=threads, flash_attn=flash_attn)
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
    records = []
    for found in store.list_local_models():
        context_length, count = _header_facts(found.path)
        records.append({**asdict(found), "path": str(found.path),
                        "parameters": found.parameters or (count and render.format_count(count)),
                        "parameter_count": count, "context_length": context_length})
    if json_output:
        render.print_json(env, {"models": records})
    elif not records:
        render.print_note(env, "no models on disk yet: try `localchat pull smollm2`")
    else:
        render.print_table(env, ["NAME", "QUANT", "SIZE", "PARAMS", "CONTEXT", "WHERE"], [
            [r["name"], r["quant"] or "-", render.format_bytes(r["size_bytes"]),
             r["parameters"] or "-", str(r["context_length"] or "-"), r["path"]]
            for r in records], fit=("NAME", "WHERE"))


def _header_facts(path: Path) -> tuple[int | None, int | None]:
    """The trained context and the parameter count the file's header gives, if it reads."""
    from localchat.modelfile import read_model_file

    try:
        info = read_model_file(path)
    except LocalchatError:
        return None, None
    return info.context_length, info.parameter_count or None


@app.command()
def show(
    model: ModelArgument,
    ctx: Annotated[int | None, typer.Option(help="Context size for the memory estimate.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
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
    memory, available = estimate_memory(info, n_ctx), available_memory_bytes()
    if json_output:
        render.print_json(env, render.model_record(ref, info, memory, n_ctx, available))
        return
    render.print_fields(env, render.model_fields(ref, info, memory, n_ctx, available))
    if info.chat_template:
        print(f"\nchat template:\n{render.terminal_safe(info.chat_template)}", file=env.stdout)


@app.command()
def rm(model: ModelArgument) -> None:
    """Delete a downloaded model (other tools' files in the cache are left alone)."""
    from localchat import store
    from localchat.catalog import resolve_model

    env = Environment()
    freed = store.remove_model(resolve_model(model, allow_path=False))
    render.print_note(env, f"removed {model} ({render.format_bytes(freed)} freed)")


# ---- `localchat history`: the saved conversations ----------------------------------------------

history_app = typer.Typer(help="Saved conversations; with no command, the most recent ones.",
                          context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(history_app, name="history")
ConversationArgument = Annotated[str, typer.Argument(help="Conversation name or id.")]
LimitOption = Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many.")]


@contextmanager
def _history() -> Iterator[Any]:
    """The history database, or None when nothing was ever saved (reading creates nothing)."""
    from localchat.history import default_history_path, open_history

    path = default_history_path()
    if not path.exists():
        yield None
        return
    with open_history(path) as store:
        yield store


def _conversation(store: Any, name_or_id: str) -> Any:
    found = store.find_conversation(name_or_id.removeprefix("#")) if store else None
    if found is None:
        raise LocalchatError(f"no conversation {name_or_id!r} in the history",
                             "list them with `localchat history`")
    return found


@history_app.callback(invoke_without_command=True)
def history_list(ctx: typer.Context, limit: LimitOption = 20) -> None:
    """Recent conversations, newest first (the default when no command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    env = Environment()
    off = _say_if_history_is_off(env)
    with _history() as store:
        summaries = store.list_conversations(limit) if store else []
    if not summaries:
        if not off:
            render.print_note(env, "no conversations yet: each `localchat run` is saved here")
        return
    render.print_table(env, ["ID", "NAME", "MODEL", "TURNS", "LAST MESSAGE", "UPDATED"], [
        [str(s.id), s.name or "-", render.model_label(s.model), str(s.turn_count),
         s.last_message or "-", render.format_when(s.updated_at)] for s in summaries],
        fit=("NAME", "MODEL", "LAST MESSAGE"))


def _say_if_history_is_off(env: Environment) -> bool:
    from localchat import paths
    from localchat.config import load_config

    if load_config().history is not False:
        return False
    render.print_note(env, f"the history is off (history = false in {paths.config_file()}): "
                           "runs and chats are not saved")
    return True


@history_app.command("show")
def history_show(conversation: ConversationArgument) -> None:
    """The whole transcript of a conversation."""
    env = Environment()
    with _history() as store:
        record = _conversation(store, conversation)
        messages = store.messages(record.id)
    fields = [("conversation", f"{record.name} (id {record.id})" if record.name else
               f"id {record.id}"), ("model", record.model),
              ("started", render.format_when(record.created_at)),
              ("turns", str(sum(message.role == "user" for message in messages)))]
    if record.system_prompt:
        fields.append(("system prompt", record.system_prompt))
    render.print_fields(env, fields)
    print(file=env.stdout)
    render.print_transcript(env, messages)


@history_app.command("search")
def history_search(
    words: Annotated[list[str], typer.Argument(help="Words to find (all of them, any form).")],
    limit: LimitOption = 20,
) -> None:
    """Full-text search over everything said, best match first."""
    env, text = Environment(), " ".join(words)
    with _history() as store:
        hits = store.search(text, limit) if store else []
    if not hits:
        render.print_note(env, f"nothing in the history matches {text!r}")
        return
    render.print_table(env, ["ID", "NAME", "ROLE", "WHEN", "MATCH"], [
        [str(hit.conversation_id), hit.conversation_name or "-", hit.role,
         render.format_when(hit.created_at), render.emphasis(hit.snippet, hit.matches)]
        for hit in hits], fit=("NAME", "MATCH"))


@history_app.command("export")
def history_export(
    conversation: ConversationArgument,
    format: Annotated[str, typer.Option("--format", "-f", help="md or json.")] = "md",
) -> None:
    """Print a conversation as Markdown or JSON."""
    env = Environment()
    with _history() as store:
        text = store.export_conversation(_conversation(store, conversation).id, format)
    env.stdout.write(text.rstrip("\n") + "\n")


@history_app.command("rm")
def history_rm(conversation: ConversationArgument) -> None:
    """Delete a conversation, its messages and its KV-cache snapshots."""
    env = Environment()
    with _history() as store:
        record = _conversation(store, conversation)
        removed = store.delete_conversation(record.id)
    snapshots = f" and {len(removed)} snapshot file(s)" if removed else ""
    render.print_note(env, f"removed conversation {conversation}{snapshots}")


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
        from localchat.errors import disk_full_error
        from localchat.render import print_error

        full = isinstance(exc, OSError) and disk_full_error(exc, exc.filename,
                                                            "free some space, then try again")
        print_error(env, full or LocalchatError(str(exc), "run with --debug for the traceback"))
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
