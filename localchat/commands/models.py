"""Getting and looking at models: `pull`, `list`, `show` and `rm`, and the way every command
that runs a model gets it on disk (`ensure_local`) and opened with the merged settings."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from localchat import render, settings
from localchat.commands.options import (
    JsonOption,
    ModelArgument,
    OfflineOption,
    env_of,
    given_settings,
)
from localchat.errors import LocalchatError, UsageError
from localchat.render import Environment

if TYPE_CHECKING:  # for annotations only: `localchat --help` imports none of these
    from localchat.engine.options import EngineOptions
    from localchat.models.catalog import ModelRef


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

def engine_options(values: dict[str, Any], ref: ModelRef, offline: bool, env: Environment,
                    verbose: bool) -> EngineOptions:
    """How to load the model `ref` with the merged settings; a missing model is pulled first."""
    from localchat.engine.options import EngineOptions, check_cache_type

    check_cache_type(values["cache_type"], values["flash_attn"])  # before any download
    options = EngineOptions.from_settings(values, ensure_local(ref, offline=offline, env=env),
                                          verbose=verbose)
    warn_beyond_training(env, options)
    spec = getattr(ref, "spec", None)  # the catalog knows a thinking model the file may not
    return replace(options, thinking=spec.thinking) if spec and spec.thinking else options

def warn_beyond_training(env: Environment, options: EngineOptions) -> None:
    """A note when the window is larger than the model was trained on (it works, but badly)."""
    if options.n_ctx is None:
        return
    from localchat.engine.options import context_warning
    from localchat.models.gguf_reader import read_model_file

    try:
        trained = read_model_file(options.model_path).context_length
    except LocalchatError:
        return  # the loader reports a bad file, with the whole story
    warning = context_warning(options.n_ctx, trained)
    if warning:
        render.print_note(env, warning)

def pull(context: typer.Context, model: ModelArgument, offline: OfflineOption = False) -> None:
    """Download a model into the Hugging Face cache (resumes, verifies sha256)."""
    from localchat.models import store
    from localchat.models.catalog import resolve_model

    env = env_of(context)
    ref = resolve_model(model, allow_path=False)
    already = store.find_local_model(ref)
    path = already or _pull(ref, offline, env)
    render.print_note(env, f"{ref.name} {'is already' if already else 'is'} at {path}")


def list_models(
    context: typer.Context, json_output: JsonOption = False,
    presets: Annotated[bool, typer.Option(
        "--presets", help="The presets of config.toml instead of the models.")] = False,
) -> None:
    """Models on disk: catalog models and any other GGUF in the Hugging Face cache."""
    env = env_of(context)
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
    from localchat.engine.options import context_warning
    from localchat.engine.runtime import available_memory_bytes
    from localchat.models import store
    from localchat.models.catalog import resolve_model
    from localchat.models.gguf_reader import estimate_memory, read_model_file

    env = env_of(context)
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


def rm(context: typer.Context, model: ModelArgument) -> None:
    """Delete a downloaded model (other tools' files in the cache are left alone)."""
    from localchat.models import store
    from localchat.models.catalog import resolve_model

    env = env_of(context)
    freed = store.remove_model(resolve_model(model, allow_path=False))
    render.print_note(env, f"removed {model} ({render.format_bytes(freed)} freed)")


