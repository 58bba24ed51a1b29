"""The `localchat` command: parse options, call the core, hand results to `render`.

This is the one place where a `LocalchatError` becomes a message and an exit code. Heavy
libraries (llama_cpp, huggingface_hub) are imported only inside the commands that use them,
so `localchat --help` stays fast.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer
from typer.models import OptionInfo

from localchat import __version__, render, settings
from localchat.errors import ExitStatus, LocalchatError, UsageError
from localchat.render import Environment

if TYPE_CHECKING:  # for annotations only: `localchat --help` imports none of these
    from localchat.chat.attachments import FileRef
    from localchat.config import Preset
    from localchat.engine.grammar import OutputGrammar
    from localchat.engine.local import EngineOptions
    from localchat.engine.protocol import Engine, Sampling
    from localchat.engine.remote import RemoteOptions
    from localchat.history.records import ConversationRecord, HistoryStore
    from localchat.models.catalog import ModelRef

app = typer.Typer(
    name="localchat",
    help="Chat with quantized GGUF models on your own computer, through llama.cpp.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text as written: "[remote]" and "[default: ...]" stay
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_MODEL = "smollm2"


def _version(context: typer.Context, value: bool) -> None:
    if value:
        from importlib import metadata

        from localchat.engine.runtime import compiled_backend

        try:
            binding = metadata.version("llama-cpp-python")
        except metadata.PackageNotFoundError:
            binding = "not installed"
        print(f"localchat {__version__}\nllama-cpp-python {binding} (llama.cpp backend: "
              f"{compiled_backend()})", file=_env(context).stdout)
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
        from localchat.models.catalog import completion_names
        from localchat.models.store import list_local_models

        names = completion_names() + [model.name for model in list_local_models()]
    except LocalchatError:
        return []
    return sorted({name for name in names if name.startswith(incomplete)})


def ensure_local(ref: ModelRef, *, env: Environment, offline: bool = False) -> Path:
    """The one way a resolved model becomes a file on disk: pull it when missing.

    A person at a terminal is asked before a download starts; scripts just get the download.
    Offline (`--offline` or HF_HUB_OFFLINE) there is nothing to ask: a missing model is an error.
    Every way this fails is a LocalchatError (Ctrl-C at the question is a KeyboardInterrupt), so
    the chat's /model can keep its current model.
    """
    if ref.kind == "path" and ref.path is not None:  # a path ref always has its path
        return ref.path
    from localchat.models import store

    path = store.find_local_model(ref)
    if path is not None:
        return path
    if not store.offline_mode(offline) and env.stdin_isatty and render.stderr_is_terminal(env) \
            and not render.confirm(env, f"{ref.name} is not on disk. Download it now?"):
        raise LocalchatError(f"{ref.name} is not on disk and was not downloaded",
                             f"`localchat pull {ref.name}` fetches it")
    return _pull(ref, offline, env)


def _pull(ref: ModelRef, offline: bool, env: Environment) -> Path:
    from localchat.models import store

    if store.offline_mode(offline):  # no progress bar for a download that cannot start
        return store.pull_model(ref, offline=True)
    with render.download_progress(env, ref.name) as (progress, status):
        return store.pull_model(ref, progress=progress, status=status, offline=offline)


ModelArgument = Annotated[str, typer.Argument(
    metavar="MODEL", help="Catalog name[:tag], owner/repo:QUANT, or a .gguf path.",
    autocompletion=_complete_model)]
DefaultModelArgument = Annotated[str | None, typer.Argument(
    metavar="MODEL", help="As for run. [default: smollm2]", autocompletion=_complete_model)]
OfflineOption = Annotated[bool, typer.Option("--offline", help="Never touch the network.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v",
                                             help="Load details and llama.cpp's log on stderr.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
SOURCES = ("Each setting comes from its flag, else config.toml, else the model's catalog "
           "defaults (models.toml), else the built-in default shown.")


# ---- flags from the settings table -------------------------------------------------------------

def _setting_option(setting: settings.Setting) -> inspect.Parameter:
    """The typer option of a settings row; None means "not given", so config and catalog count."""
    kind: Any = {"int": int, "float": float, "bool": bool, "str": str, "list": list[str]}[
        setting.kind]
    metavar = None if setting.kind == "bool" else setting.metavar or {
        "int": "N", "float": "NUMBER"}.get(setting.kind, "TEXT")
    option = typer.Option(*setting.flags, metavar=metavar, show_default=False,
                          help=f"{setting.help} [default: {setting.default_text}]")
    return inspect.Parameter(setting.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             default=None, annotation=Annotated[kind | None, option])


def takes_settings(command: settings.Command) -> Callable[[Any], Any]:
    """Give a command one flag per settings row it takes, after its arguments; the values reach
    its `**flags` by row name (typer reads the parameters from `__signature__`)."""
    def decorate(function: Any) -> Any:
        signature = inspect.signature(function, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        first_option = next(i for i, p in enumerate(own) if any(
            isinstance(info, OptionInfo) for info in get_args(p.annotation)[1:]))
        table = [_setting_option(setting) for setting in settings.for_command(command)]
        function.__signature__ = signature.replace(
            parameters=[*own[:first_option], *table, *own[first_option:]])
        return function
    return decorate


def given_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """The settings flags that were given, checked; a bad one is a usage error naming its flag."""
    given = {}
    for name, value in flags.items():
        setting = settings.get(name)
        if value is None or value == [] or setting.switch and value is False:
            continue  # not given: config.toml, the catalog or the built-in default decides
        if setting.kind == "list":
            value = [settings.unescape(item) for item in value]
        try:
            given[name] = settings.checked(setting, value)
        except settings.Invalid as problem:
            raise UsageError(f"{setting.flag_name} {problem}") from None
    return given


@app.command(epilog=SOURCES)
@takes_settings("run")
def run(
    context: typer.Context,
    model: Annotated[str | None, typer.Argument(
        metavar="MODEL", autocompletion=_complete_model,
        help="Catalog name[:tag], owner/repo:QUANT, or a .gguf path. [default: smollm2; with "
             "--continue, --session or --preset a lone argument is the PROMPT]")] = None,
    prompt: Annotated[str | None, typer.Argument(
        metavar="PROMPT", help="The prompt; attached files, then piped stdin, come first.")
    ] = None,
    files: Annotated[list[str] | None, typer.Option(
        "--file", "-f", metavar="PATH",
        help="Attach a text file to the message, named and fenced (repeatable; - is stdin).")
    ] = None,
    schema: Annotated[str | None, typer.Option(metavar="SCHEMA", help=(
        "Reply with JSON valid against SCHEMA: a JSON Schema (file or inline) or fields, "
        "e.g. 'name, age int, tags list, bio: a short bio'."))] = None,
    output_format: Annotated[str | None, typer.Option(
        "--format", metavar="json", help="Reply with any JSON object.")] = None,
    grammar: Annotated[str | None, typer.Option(
        metavar="FILE", help="Reply in the GBNF grammar in FILE.")] = None,
    preset: Annotated[str | None, typer.Option(metavar="NAME", help=(
        "Start from [presets.NAME] in config.toml (model, system, settings, schema, files); "
        "flags override it."))] = None,
    json_output: JsonOption = False,
    show_thinking: Annotated[bool, typer.Option(
        "--show-thinking", help="Show a thinking model's thinking in full, on stderr (also in "
        "a pipe, where only the answer goes to stdout).")] = False,
    verbose: VerboseOption = False,
    offline: OfflineOption = False,
    endpoint: Annotated[str | None, typer.Option(metavar="URL", help=(
        "Use the OpenAI-compatible server at URL; MODEL is then its model id."))] = None,
    api_key: Annotated[str | None, typer.Option(
        metavar="KEY", help="Key for --endpoint. [default: $LOCALCHAT_API_KEY]")] = None,
    session: Annotated[str | None, typer.Option(metavar="NAME", help=(
        "Continue the conversation NAME (created if new), in the chat or one-shot."))] = None,
    continue_last: Annotated[bool, typer.Option(
        "--continue", "-c", help="Continue the last conversation, in the chat or one-shot.")
    ] = False,
    local: Annotated[bool, typer.Option(
        "--local", help="Run on this machine even when config.toml has a [remote] section.")
    ] = False,
    **flags: Any,
) -> None:
    """Chat at a terminal, or stream a reply to PROMPT (and piped stdin); pulls MODEL if missing."""
    from localchat import oneshot
    from localchat.config import find_preset, load_config
    from localchat.models.catalog import resolve_model

    env, given, config = _env(context), given_settings(flags), load_config()
    chosen = find_preset(config, preset) if preset is not None else None
    layered = {**config.settings, **(chosen.settings if chosen else {})}  # flag > preset > config
    knows_model = continue_last or session is not None or chosen is not None
    if prompt is None and model is not None and (
            _is_prompt(model) or knows_model and not _names_model(model)):
        model, prompt = None, model  # `localchat run -c "and in French?"`: the PROMPT
    interactive = prompt is None and env.stdin_isatty and not json_output
    record = _conversation_to_continue(session, continue_last, interactive,
                                       settings.merge(given, layered, {})["history"], env)
    model = model or (record.model if record else None) or (chosen.model if chosen else None)
    configured = not local and endpoint is None and bool(config.remote_endpoint)
    if configured:
        endpoint, model = config.remote_endpoint, model or config.remote_model
    ref = None if endpoint else _resolve_run_model(model, prompt, config.model)
    if ref is None:  # the server owns the model: no catalog, no download, no load settings
        _refuse_local_flags(given, configured)
    values = settings.merge(given, layered, ref.defaults.settings if ref else {})
    request = oneshot.Request(
        model=ref.name if ref else model or "", prompt=prompt,
        sampling=_sampling(values, _output_grammar(schema, output_format, grammar, chosen),
                           remote=ref is None),
        system=_system_prompt(values, given, chosen, record),
        engine=_engine_options(values, ref, offline, env, verbose) if ref else None,
        remote=None if ref else _remote(endpoint, model, api_key),
        json_output=json_output, verbose=verbose, history=values["history"],
        show_thinking=show_thinking, files=_file_refs(chosen, files), conversation=record,
        session=session if record is None else None, preset=preset,
        snapshot_cap_bytes=config.snapshot_cap_mb * 1_000_000 if config.snapshot_cap_mb else None,
        settings={"preset": preset} if preset else {})
    if not interactive:
        raise typer.Exit(oneshot.run_once(request, env))

    def load_model(name: str) -> tuple[str, Engine]:  # /model NAME in the chat
        if ref is None:
            from localchat.engine.remote import RemoteEngine

            return name, RemoteEngine(_remote(endpoint, name, api_key))
        from localchat.engine.loader import load_engine

        new = resolve_model(name)
        return new.name, load_engine(_engine_options(
            settings.merge(given, layered, new.defaults.settings), new, offline, env,
            verbose))

    from localchat.chat.repl import run_repl
    from localchat.chat.session import ReplOptions

    cap = {} if config.snapshot_cap_mb is None else {
        "snapshot_cap_bytes": config.snapshot_cap_mb * 1_000_000}  # MB, as sizes are everywhere
    raise typer.Exit(run_repl(request, env, ReplOptions(
        markdown=values["markdown"], session=session, resume_last=continue_last,
        load_model=load_model, presets=config.presets, **cap)))


def _conversation_to_continue(session: str | None, continue_last: bool, interactive: bool,
                              history: bool, env: Environment) -> ConversationRecord | None:
    """The saved conversation a one-shot continues (the chat finds its own), or None."""
    if session is None and not continue_last:
        return None
    flag = "--session" if session is not None else "--continue"
    if not history:
        raise UsageError(f"{flag} continues a saved conversation, and the history is off",
                         "drop --no-history (or set history = true in config.toml)")
    if session is not None and continue_last:
        raise UsageError("--session and --continue cannot be used together",
                         "--session NAME picks a conversation; --continue picks the last one")
    if interactive:
        return None
    from localchat.oneshot import find_conversation

    return find_conversation(session, continue_last, env)


def _system_prompt(values: dict[str, Any], given: dict[str, Any], preset: Preset | None,
                   record: ConversationRecord | None) -> str | None:
    """The system prompt: a continued conversation keeps its own unless --system or the preset
    says otherwise (config.toml's default is for new conversations)."""
    chosen: str | None = values["system"] if record is None else (
        given.get("system") or (preset.settings.get("system") if preset else None))
    return chosen


def _output_grammar(schema: str | None, output_format: str | None, grammar: str | None,
                    preset: Preset | None) -> OutputGrammar | None:
    """--schema, --format json or --grammar (one of them), else the preset's; None: free text."""
    from localchat.engine.grammar import output_grammar

    if preset is not None and (schema, output_format, grammar) == (None, None, None):
        return output_grammar(preset.schema, preset.format, preset.grammar, preset.base,
                              f"[presets.{preset.name}] ")
    return output_grammar(schema, output_format, grammar)


def _sampling(values: dict[str, Any], grammar: OutputGrammar | None, remote: bool) -> Sampling:
    from dataclasses import replace

    from localchat.engine.protocol import Sampling

    sampling = Sampling.from_settings(values)
    if grammar is None:
        return sampling
    if remote:
        raise UsageError("--schema, --format and --grammar need the local engine",
                         "the grammar sampler is llama.cpp's; run without --endpoint (or with "
                         "--local)")
    if sampling.ignore_eos:
        raise UsageError("--ignore-eos cannot be used with a grammar",
                         "a finished grammar allows only the end of the reply")
    return replace(sampling, grammar=grammar)


def _file_refs(preset: Preset | None, files: list[str] | None) -> tuple[FileRef, ...]:
    """The preset's files (from its folder) first, then each -f in order."""
    from localchat.chat.attachments import FileRef

    first = [FileRef(path, preset.base) for path in preset.files] if preset else []
    return (*first, *(FileRef(path) for path in files or ()))


def _names_model(argument: str) -> bool:
    """A lone argument next to -c, --session or --preset is the MODEL only if it names one (a
    catalog name or an existing file): `localchat run smollm2 --session trip` is still a chat."""
    from localchat.models.catalog import resolve_model

    try:
        resolve_model(argument)
    except LocalchatError:
        return False
    return True


def _is_prompt(argument: str) -> bool:
    """A model name never contains whitespace: a lone argument that does is the prompt."""
    return any(character.isspace() for character in argument)


def _resolve_run_model(model: str | None, prompt: str | None,
                       configured: str | None) -> ModelRef:
    """`run`'s MODEL; a lone word that names no model is probably a one-word prompt."""
    from localchat.models.catalog import resolve_model

    try:
        return resolve_model(model or configured or DEFAULT_MODEL)
    except UsageError as exc:
        if model is None or prompt is not None:
            raise
        default = configured or DEFAULT_MODEL
        usage = f'a one-word prompt for the default model: localchat run {default} "{model}"'
        raise UsageError(exc.message, f"{exc.hint}; {usage}" if exc.hint else usage) from exc


def _engine_options(values: dict[str, Any], ref: ModelRef, offline: bool, env: Environment,
                    verbose: bool) -> EngineOptions:
    """How to load the model `ref` with the merged settings; a missing model is pulled first."""
    from localchat.engine.local import EngineOptions, check_cache_type

    check_cache_type(values["cache_type"], values["flash_attn"])  # before any download
    options = EngineOptions.from_settings(values, ensure_local(ref, offline=offline, env=env),
                                          verbose=verbose)
    _warn_beyond_training(env, options)
    spec = getattr(ref, "spec", None)  # the catalog knows a thinking model the file may not
    return replace(options, thinking=spec.thinking) if spec and spec.thinking else options


def _remote(endpoint: str | None, model: str | None, api_key: str | None) -> RemoteOptions:
    from localchat.engine.remote import remote_options

    return remote_options(endpoint or "", model, api_key)


def _refuse_local_flags(flags: dict[str, Any], configured: bool) -> None:
    """A server runs its own model: a load flag with --endpoint is a mistake, not a no-op."""
    given = [_spelled(settings.get(name), value) for name, value in flags.items()
             if settings.get(name).scope == "load"]
    if given:
        server = "the [remote] server of config.toml" if configured else "--endpoint"
        verb, them = ("apply", "them") if len(given) > 1 else ("applies", "it")
        raise UsageError(
            f"{', '.join(given)} {verb} only to a model run on this machine, not with {server}",
            f"leave {them} out: the server has its own settings"
            + ("; or add --local to run on this machine" if configured else ""))


def _warn_beyond_training(env: Environment, options: EngineOptions) -> None:
    """A note when the window is larger than the model was trained on (it works, but badly)."""
    if options.n_ctx is None:
        return
    from localchat.engine.local import context_warning
    from localchat.models.gguf_reader import read_model_file

    try:
        trained = read_model_file(options.model_path).context_length
    except LocalchatError:
        return  # the loader reports a bad file, with the whole story
    warning = context_warning(options.n_ctx, trained)
    if warning:
        render.print_note(env, warning)


def _spelled(setting: settings.Setting, value: object) -> str:
    """A flag as the user typed it: `--no-mmap` for a pair given False."""
    positive, _, negative = setting.flags[0].partition("/")
    return negative if negative and value is False else positive


@app.command(epilog=SOURCES)
@takes_settings("serve")
def serve(
    context: typer.Context,
    models: Annotated[list[str] | None, typer.Argument(
        metavar="MODEL", autocompletion=_complete_model, show_default=False,
        help="Models to load at start (any form, .gguf paths too); every model on disk is "
             "served either way, loaded on first request.")] = None,
    host: Annotated[str, typer.Option(
        metavar="ADDRESS", help="Address to listen on; 0.0.0.0 for all.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        metavar="N", help="Port to listen on; 0 picks a free one, 11434 is Ollama's.")] = 8080,
    api_key: Annotated[str | None, typer.Option(
        metavar="KEY", help="Require this key. [default: $LOCALCHAT_API_KEY]")] = None,
    max_loaded: Annotated[int | None, typer.Option(metavar="N", show_default=False, help=(
        "Models loaded at once; the least recently used is unloaded for the next. "
        "[default: 1, or the number of MODELs]"))] = None,
    queue: Annotated[int, typer.Option(metavar="N", help=(
        "Requests that may wait for a busy model; more get 429 with Retry-After."))] = 32,
    client_timeout: Annotated[float, typer.Option(metavar="SECONDS", help=(
        "How long a client may take to send a request's head, and then its body."))] = 30.0,
    verbose: VerboseOption = False,
    offline: OfflineOption = False,
    **flags: Any,
) -> None:
    """Serve the models on disk over the OpenAI API (/v1) and Ollama's API (/api).

    A request's sampling fields default to what `localchat run` would use for its model.
    """
    from localchat.config import load_config
    from localchat.models.catalog import resolve_model
    from localchat.serve import server
    from localchat.serve.models import ModelDirectory, describe_with

    env, given, config = _env(context), given_settings(flags), load_config()
    describe = describe_with(
        lambda ref: settings.merge(given, config.settings, ref.defaults.settings), verbose)
    preload = []
    for ref in map(resolve_model, models or []):
        preload.append(describe(ref, ensure_local(ref, offline=offline, env=env)))
        _warn_beyond_training(env, preload[-1].options)
    if max_loaded is not None and max_loaded < len(preload):
        raise UsageError(f"--max-loaded {max_loaded} is fewer than the {len(preload)} models "
                         "named to load at start", "raise --max-loaded or name fewer models")
    served = server.serve_settings(host, port, api_key, max_loaded=max_loaded or max(
        1, len(preload)), queue_size=queue, client_timeout=client_timeout, verbose=verbose)
    raise typer.Exit(server.serve(ModelDirectory(preload, describe), preload, served,
                                  lambda line: render.print_note(env, line)))


TASK_GROUPS = ("grounded", "open", "all")  # bench_tasks.TASK_GROUPS, without importing it


def _bench_tasks(env: Environment, options: Any, group: str, repetitions: int,
                 json_output: bool) -> int:
    """`bench --task GROUP`: the shipped workloads, drafts off and on; the exit status."""
    from localchat import bench_tasks
    from localchat.engine.loader import load_engine

    engine = load_engine(options)
    try:
        results = bench_tasks.run_tasks(engine, group, repetitions,
                                        lambda what: render.print_note(env, what)
                                        if render.stderr_is_terminal(env) else None)
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    finally:
        engine.close()
    record = bench_tasks.task_record(results)
    if json_output:
        render.print_json(env, {"model": str(options.model_path), "tasks": record,
                                "threads": engine.info.threads,
                                "cache_type": options.cache_type})
    else:
        render.print_table(env, bench_tasks.TASK_COLUMNS, bench_tasks.task_rows(record))
    return ExitStatus.OK


@app.command(epilog=SOURCES)
@takes_settings("bench")
def bench(
    context: typer.Context,
    model: DefaultModelArgument = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", metavar="N",
                                               help="Prompt size in tokens.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-n", metavar="N",
                                            help="Tokens to generate.")] = 128,
    repetitions: Annotated[int, typer.Option(metavar="N",
                                             help="Measured runs after a warm-up.")] = 5,
    json_output: JsonOption = False,
    offline: OfflineOption = False,
    drop_all_caches: Annotated[bool, typer.Option(
        "--drop-all-caches", help="As root, empty the whole machine's page cache for the cold "
        "load when the model file's own pages cannot be dropped.")] = False,
    task: Annotated[str | None, typer.Option(
        metavar="GROUP", help="Instead: decode the shipped workloads of GROUP (grounded, open "
        "or all) with drafts off and on, side by side.")] = None,
    **flags: Any,
) -> None:
    """Measure prefill and decode speed, first-token latency, load time and memory."""
    from contextlib import nullcontext

    from localchat import bench as benchmark
    from localchat.config import load_config
    from localchat.models.catalog import resolve_model

    env, given, config = _env(context), given_settings(flags), load_config()
    bench_settings = benchmark.BenchSettings(prompt_tokens, gen_tokens, repetitions,
                                             drop_all_caches=drop_all_caches)
    bench_settings.validate()  # before a download can start, like every flag
    if task is not None and task not in TASK_GROUPS:
        raise UsageError(f"--task must be one of {', '.join(TASK_GROUPS)} (got {task!r})")
    ref = resolve_model(model or config.model or DEFAULT_MODEL)
    values = settings.merge(given, config.settings, ref.defaults.settings)
    options = _engine_options(values, ref, offline, env, verbose=False)
    if task is not None:
        raise typer.Exit(_bench_tasks(env, options, task, repetitions, json_output))
    bench_settings = replace(bench_settings, draft=values["draft"])
    bar = None
    if render.stderr_is_terminal(env):
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(file=env.stderr), transient=True)
        bar_task = bar.add_task("bench", total=None)
    with bar or nullcontext():
        result = benchmark.run_benchmark(bench_settings, options, (
            lambda what, done, total: bar.update(bar_task, description=what, completed=done,
                                                 total=total)) if bar is not None else None)
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
def pull(context: typer.Context, model: ModelArgument, offline: OfflineOption = False) -> None:
    """Download a model into the Hugging Face cache (resumes, verifies sha256)."""
    from localchat.models import store
    from localchat.models.catalog import resolve_model

    env = _env(context)
    ref = resolve_model(model, allow_path=False)
    already = store.find_local_model(ref)
    path = already or _pull(ref, offline, env)
    render.print_note(env, f"{ref.name} {'is already' if already else 'is'} at {path}")


@app.command("list")
def list_models(
    context: typer.Context, json_output: JsonOption = False,
    presets: Annotated[bool, typer.Option(
        "--presets", help="The presets of config.toml instead of the models.")] = False,
) -> None:
    """Models on disk: catalog models and any other GGUF in the Hugging Face cache."""
    env = _env(context)
    if presets:
        _list_presets(env, json_output)
        return
    from localchat.models import store

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


def _list_presets(env: Environment, json_output: bool) -> None:
    from localchat import paths
    from localchat.config import load_config

    presets = load_config().presets
    if json_output:
        render.print_json(env, {"presets": [
            {"name": p.name, "model": p.model, "settings": dict(p.settings), "schema": p.schema,
             "format": p.format, "grammar": p.grammar, "files": list(p.files)}
            for p in presets.values()]})
    elif not presets:
        render.print_note(env, f"no presets yet: add a [presets.NAME] table to "
                               f"{paths.config_file()}")
    else:
        render.print_table(env, ["NAME", "MODEL", "SYSTEM", "SETTINGS"], [
            [p.name, p.model or "-", _preview(p.settings.get("system")), p.summary or "-"]
            for p in presets.values()])


def _preview(text: str | None, width: int = 40) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _header_facts(path: Path) -> tuple[int | None, int | None]:
    """The trained context and the parameter count the file's header gives, if it reads."""
    from localchat.models.gguf_reader import read_model_file

    try:
        info = read_model_file(path)
    except LocalchatError:
        return None, None
    return info.context_length, info.parameter_count or None


@app.command()
def show(
    context: typer.Context,
    model: ModelArgument,
    ctx: Annotated[int | None, typer.Option(
        metavar="N", help="Context size for the memory estimate. [default: as run opens it]")
    ] = None,
    cache_type: Annotated[str | None, typer.Option(
        "--cache-type", metavar="TYPE", help="KV cache type for the memory estimate: "
        f"{', '.join(settings.CACHE_TYPES)}. [default: as run opens it]")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """A model's metadata, chat template and memory needs, without loading the weights."""
    from localchat.engine.local import context_warning
    from localchat.engine.runtime import available_memory_bytes
    from localchat.models import store
    from localchat.models.catalog import resolve_model
    from localchat.models.gguf_reader import estimate_memory, read_model_file

    env = _env(context)
    ref = resolve_model(model)
    path = store.find_local_model(ref) if ref.kind != "path" else ref.path
    if path is None:
        raise LocalchatError(f"{ref.name} is not on disk", f"localchat pull {ref.name}")
    info = read_model_file(path)
    n_ctx = ctx or ref.defaults.get("ctx") or min(info.context_length or 4096, 4096)
    if n_ctx < 1:
        raise UsageError(f"--ctx must be at least 1 (got {n_ctx})")
    warning = context_warning(n_ctx, info.context_length)
    if warning:
        render.print_note(env, warning)
    kv_type = given_settings({"cache_type": cache_type}).get("cache_type") \
        or ref.defaults.get("cache_type") or settings.get("cache_type").default
    memory, available = estimate_memory(info, n_ctx, kv_type), available_memory_bytes()
    thinking = _thinking_of(info, ref)
    if json_output:
        render.print_json(env, render.model_record(ref, info, memory, n_ctx, available,
                                                   thinking))
        return
    render.print_fields(env, render.model_fields(ref, info, memory, n_ctx, available, thinking))
    if info.chat_template:
        print(f"\nchat template:\n{render.terminal_safe(info.chat_template)}", file=env.stdout)


def _thinking_of(info: Any, ref: Any) -> Any:
    """Whether the model thinks, from its header's template and vocabulary or the catalog."""
    from localchat.engine import templates

    try:
        template = templates.choose_template(info.chat_template, info.architecture,
                                             info.special_tokens)
    except LocalchatError:
        template = templates.ChatTemplate("none", "none", None)
    spec = getattr(ref, "spec", None)
    return templates.thinking_of(template, info.special_tokens, spec.thinking if spec else None)


@app.command()
def rm(context: typer.Context, model: ModelArgument) -> None:
    """Delete a downloaded model (other tools' files in the cache are left alone)."""
    from localchat.models import store
    from localchat.models.catalog import resolve_model

    env = _env(context)
    freed = store.remove_model(resolve_model(model, allow_path=False))
    render.print_note(env, f"removed {model} ({render.format_bytes(freed)} freed)")


# ---- `localchat history`: the saved conversations ----------------------------------------------

history_app = typer.Typer(help="Saved conversations; with no command, the most recent ones.",
                          rich_markup_mode=None,
                          context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(history_app, name="history")
ConversationArgument = Annotated[str, typer.Argument(metavar="CONVERSATION",
                                                    help="Conversation name or id.")]
LimitOption = Annotated[int, typer.Option("--limit", "-n", min=1, metavar="N",
                                          help="At most this many.")]


@contextmanager
def _history() -> Iterator[HistoryStore | None]:
    """The history database, or None when nothing was ever saved (reading creates nothing)."""
    from localchat.history.database import default_history_path
    from localchat.history.records import open_history

    path = default_history_path()
    if not path.exists():
        yield None
        return
    with open_history(path) as store:
        yield store


def _conversation(store: HistoryStore | None,
                  name_or_id: str) -> tuple[HistoryStore, ConversationRecord]:
    found = store.find_conversation(name_or_id.removeprefix("#")) if store else None
    if store is None or found is None:
        raise LocalchatError(f"no conversation {name_or_id!r} in the history",
                             "list them with `localchat history`")
    return store, found


@history_app.callback(invoke_without_command=True)
def history_list(ctx: typer.Context, limit: LimitOption = 20) -> None:
    """Recent conversations, newest first (the default when no command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    env = _env(ctx)
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

    if load_config().settings.get("history") is not False:
        return False
    render.print_note(env, f"the history is off (history = false in {paths.config_file()}): "
                           "runs and chats are not saved")
    return True


@history_app.command("show")
def history_show(context: typer.Context, conversation: ConversationArgument) -> None:
    """The whole transcript of a conversation."""
    env = _env(context)
    with _history() as store:
        store, record = _conversation(store, conversation)
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
def history_search(context: typer.Context, 
    words: Annotated[list[str], typer.Argument(
        metavar="WORDS", help="Words to find (all of them, any form).")],
    limit: LimitOption = 20,
) -> None:
    """Full-text search over everything said, best match first."""
    env, text = _env(context), " ".join(words)
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
def history_export(context: typer.Context, 
    conversation: ConversationArgument,
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT",
                                        help="md or json.")] = "md",
) -> None:
    """Print a conversation as Markdown or JSON."""
    env = _env(context)
    with _history() as store:
        store, record = _conversation(store, conversation)
        text = store.export_conversation(record.id, format)
    env.stdout.write(text.rstrip("\n") + "\n")


@history_app.command("rm")
def history_rm(context: typer.Context, conversation: ConversationArgument) -> None:
    """Delete a conversation, its messages and its KV-cache snapshots."""
    env = _env(context)
    with _history() as store:
        store, record = _conversation(store, conversation)
        removed = store.delete_conversation(record.id)
    snapshots = f" and {len(removed)} snapshot file(s)" if removed else ""
    render.print_note(env, f"removed conversation {conversation}{snapshots}")


def _env(context: typer.Context) -> Environment:
    """The Environment `main` was given, which click hands from context to sub-context."""
    env = context.obj
    assert isinstance(env, Environment), "commands run through cli.main"
    return env


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
        from localchat.render import print_error

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
    except Exception as exc:  # a bug: one line, not a traceback, unless asked for
        if debug:
            raise
        from localchat.render import print_error

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
