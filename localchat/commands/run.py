"""`localchat run`: a one-shot reply (oneshot.py) or the chat (chat/repl.py), locally or with
--endpoint, continuing a saved conversation, from a preset, with files and an output grammar."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from localchat import settings
from localchat.commands.models import engine_options
from localchat.commands.options import (
    DEFAULT_MODEL,
    JsonOption,
    OfflineOption,
    VerboseOption,
    complete_model,
    env_of,
    given_settings,
    spelled,
    takes_settings,
)
from localchat.errors import LocalchatError, UsageError
from localchat.render import Environment

if TYPE_CHECKING:  # for annotations only: `localchat --help` imports none of these
    from localchat.chat.attachments import FileRef
    from localchat.config import Preset
    from localchat.engine.grammar import OutputGrammar
    from localchat.engine.protocol import Engine, Sampling
    from localchat.engine.remote import RemoteOptions
    from localchat.history.records import ConversationRecord
    from localchat.models.catalog import ModelRef


@takes_settings("run")
def run(
    context: typer.Context,
    model: Annotated[str | None, typer.Argument(
        metavar="MODEL", autocompletion=complete_model,
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

    env, given, config = env_of(context), given_settings(flags), load_config()
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
        engine=engine_options(values, ref, offline, env, verbose) if ref else None,
        remote=None if ref else _remote(endpoint, model, api_key),
        json_output=json_output, verbose=verbose, history=values["history"],
        show_thinking=show_thinking, files=_file_refs(chosen, files), conversation=record,
        session=session if record is None else None, preset=preset,
        snapshot_cap_bytes=config.snapshot_cap_bytes,
        settings={"preset": preset} if preset else {})
    if not interactive:
        raise typer.Exit(oneshot.run_once(request, env))

    def load_model(name: str) -> tuple[str, Engine]:  # /model NAME in the chat
        if ref is None:
            from localchat.engine.remote import RemoteEngine

            return name, RemoteEngine(_remote(endpoint, name, api_key))
        from localchat.engine.loader import load_engine

        new = resolve_model(name)
        return new.name, load_engine(engine_options(
            settings.merge(given, layered, new.defaults.settings), new, offline, env,
            verbose))

    from localchat.chat.repl import run_repl
    from localchat.chat.session import ReplOptions

    cap = {} if config.snapshot_cap_bytes is None else {
        "snapshot_cap_bytes": config.snapshot_cap_bytes}
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




def _remote(endpoint: str | None, model: str | None, api_key: str | None) -> RemoteOptions:
    from localchat.engine.remote import remote_options

    return remote_options(endpoint or "", model, api_key)


def _refuse_local_flags(flags: dict[str, Any], configured: bool) -> None:
    """A server runs its own model: a load flag with --endpoint is a mistake, not a no-op."""
    given = [spelled(settings.get(name), value) for name, value in flags.items()
             if settings.get(name).scope == "load"]
    if given:
        server = "the [remote] server of config.toml" if configured else "--endpoint"
        verb, them = ("apply", "them") if len(given) > 1 else ("applies", "it")
        raise UsageError(
            f"{', '.join(given)} {verb} only to a model run on this machine, not with {server}",
            f"leave {them} out: the server has its own settings"
            + ("; or add --local to run on this machine" if configured else ""))
