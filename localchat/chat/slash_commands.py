"""The REPL's slash commands: each one a function of the live chat and the rest of the line.

Kept apart from `repl` so the loop stays short: here is the table of commands (which `/help`
prints and Tab completes), their handlers, and the completion of their arguments. A handler
returns False to leave the chat; a bad command or value raises `UsageError`, which the loop
prints as one line before it reads the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from localchat import settings
from localchat.chat.conversation import parse_setting, slash_settings
from localchat.engine.protocol import Sampling
from localchat.errors import LocalchatError, UsageError
from localchat.render import (
    format_drafts,
    format_rate,
    format_when,
    model_label,
    print_fields,
    print_note,
    print_table,
    terminal_safe,
)

if TYPE_CHECKING:
    from localchat.chat.session import ChatSession
    from localchat.history.records import HistoryStore

Handler = Callable[["ChatSession", str], bool]


@dataclass(frozen=True)
class Command:
    """One slash command: how to type it, what it does, and the function that does it."""

    usage: str
    summary: str
    handler: Handler


def run_command(chat: ChatSession, line: str) -> bool:
    """Run one `/command argument` line; False means leave the chat."""
    name, _, argument = line.partition(" ")
    key = ALIASES.get(name.lower(), name.lower())
    command = COMMANDS.get(key)
    if command is None:
        raise UsageError(f"unknown command {name[:40]}",
                         'see /help; to send text that starts with /, wrap it in """')
    return command.handler(chat, argument.strip())


def _help(chat: ChatSession, argument: str) -> bool:
    width = max(len(command.usage) for command in COMMANDS.values())
    lines = [f"{command.usage.ljust(width)}  {command.summary}" for command in COMMANDS.values()]
    lines += ['Multi-line input: start with """ and end with """, or press Esc-Enter (Alt-Enter) '
              "for a new line.",
              "Ctrl-C stops a reply (the part shown is kept) or clears the line; Ctrl-D leaves."]
    chat.env.stdout.write("\n".join(lines) + "\n")
    return True


def _set(chat: ChatSession, argument: str) -> bool:
    name, _, raw = argument.partition(" ")
    if not name:
        raise UsageError("usage: /set PARAM VALUE", f"settings: {', '.join(slash_settings())}")
    key, value = parse_setting(name, raw)
    if key == "system":
        _change_system(chat, str(value))
    elif key == "markdown":
        chat.markdown = bool(value)
        print_note(chat.env, f"markdown {'on' if value else 'off'}")
    else:  # a sampling setting
        chat.sampling = Sampling.from_settings({**asdict(chat.sampling), key: value})
        chat.with_history(lambda store, cid: store.update_settings(cid, {key: value}))
        print_note(chat.env, f"{key} = {settings.format_value(settings.get(key), value)}")
    return True


def _system(chat: ChatSession, argument: str) -> bool:
    if argument:
        _change_system(chat, argument)
    else:
        shown = terminal_safe(chat.conversation.system or "(none)")  # it may come from a file
        print_note(chat.env, f"system prompt: {shown}")
    return True


def _change_system(chat: ChatSession, text: str) -> None:
    chat.conversation = chat.conversation.with_system(text)
    system = chat.conversation.system
    chat.with_history(lambda store, cid: store.set_system_prompt(cid, system))
    chat.refresh_usage()
    print_note(chat.env, "system prompt set" if system else "system prompt removed")


def _show(chat: ChatSession, argument: str) -> bool:
    engine = chat.engine
    info = engine.info
    fields = [("model", chat.model), ("file", str(info.model_path)),
              ("context", f"{engine.n_ctx} tokens"), ("backend", info.backend),
              ("chat template", f"{info.chat_format} ({info.chat_format_source})")]
    for setting in settings.in_scope("sampling"):
        value = getattr(chat.sampling, setting.name)
        if setting.slash or value != setting.default:  # a flag-only one only when it is set
            shown = settings.format_value(setting, value)
            inexact = getattr(info, "inexact_drafts", None)  # engine/speculative.py says why
            if setting.name == "draft" and inexact and value != "off":
                from localchat.engine.speculative import drafts

                caveat = "the text may differ" if drafts(value, inexact) else "not drafting"
                shown += f" ({caveat}: {inexact})"
            fields.append((setting.name, shown))
    fields += [("markdown", "on" if chat.markdown else "off"),
               ("system prompt", chat.conversation.system or "(none)"),
               ("conversation", _conversation_label(chat))]
    print_fields(chat.env, fields)
    return True


def _conversation_label(chat: ChatSession) -> str:
    if chat.store is None:
        return "not saved (the history is off)"
    if chat.record is None:
        return f"new, saved as {chat.name} from the first message" if chat.name else \
            "new, saved from the first message"
    return chat.record.label


def _clear(chat: ChatSession, argument: str) -> bool:
    chat.start_new()
    print_note(chat.env, "new conversation (same model and system prompt)")
    return True


def _undo(chat: ChatSession, argument: str) -> bool:
    chat.conversation = chat.conversation.undo()
    chat.with_history(lambda store, cid: store.delete_last_exchange(cid))
    chat.refresh_usage()
    print_note(chat.env, "removed the last exchange")
    return True


def _retry(chat: ChatSession, argument: str) -> bool:
    chat.conversation = chat.conversation.without_last_reply()
    chat.with_history(_delete_last_reply)
    chat.reply()
    return True


def _delete_last_reply(store: HistoryStore, conversation_id: int) -> None:
    users = [m.id for m in store.messages(conversation_id) if m.role == "user"]
    if users:
        store.delete_messages_after(users[-1])


def _context(chat: ChatSession, argument: str) -> bool:
    chat.refresh_usage()
    chat.env.stdout.write(f"{chat.used_tokens} / {chat.engine.n_ctx} tokens used\n")
    return True


def _stats(chat: ChatSession, argument: str) -> bool:
    stats = chat.engine.last_stats
    if stats is None:
        print_note(chat.env, "no reply yet")
        return True
    chat.env.stdout.write(
        f"prompt    {stats.prompt_tokens} tokens: {stats.cached_tokens} reused from the cache, "
        f"{stats.prefill_tokens} processed in {stats.prefill_s * 1000:.0f} ms "
        f"({format_rate(stats.prefill_tokens_per_s)})\n"
        f"first token after {stats.ttft_s * 1000:.0f} ms\n"
        f"reply     {stats.completion_tokens} tokens in {stats.decode_s:.2f} s "
        f"({format_rate(stats.decode_tokens_per_s)}), finish {stats.finish_reason}\n"
        + (f"thinking  {stats.reasoning_tokens} of the reply's tokens; "
           f"answer {stats.completion_tokens - stats.reasoning_tokens}\n"
           if stats.reasoning_tokens else "")
        + (f"drafts    {format_drafts(stats)}\n" if format_drafts(stats) else ""))
    return True


def _think(chat: ChatSession, argument: str) -> bool:
    """/think on|off, /think budget N|none; alone: where thinking stands."""
    words = argument.lower().split()
    thinking = getattr(chat.engine, "thinking", None)
    if not words:
        sampling = chat.sampling
        state = {True: "on", False: "off", None: "the model's default"}[sampling.think]
        budget = "none" if sampling.think_budget is None else sampling.think_budget
        what = thinking.describe() if thinking else "this model does not seem to think"
        print_note(chat.env, f"thinking {state}, budget {budget}; {what}")
        return True
    if words[0] in ("on", "off") and len(words) == 1:
        value = words[0] == "on"
        if not value and thinking is not None and thinking.switch is None:
            raise UsageError("this model cannot switch its thinking off: its chat template has "
                             "no switch", "/think budget 0 makes it answer at once")
        _set(chat, f"think {words[0]}")
    elif words[0] == "budget" and len(words) == 2:
        _set(chat, f"think_budget {words[1]}")
    else:
        raise UsageError(f"usage: /think on|off, or /think budget N (got {argument[:40]!r})",
                         "/think budget none removes the budget")
    return True


def _thinking(chat: ChatSession, argument: str) -> bool:
    """The last reply's thinking, in full."""
    last = next((m for m in reversed(chat.conversation.messages) if m.role == "assistant"),
                None)
    if last is None or not last.reasoning:
        print_note(chat.env, "the last reply had no thinking" if last else "no reply yet")
        return True
    text = last.reasoning.rstrip("\n")
    chat.env.stdout.write((terminal_safe(text) if chat.env.stdout_isatty else text) + "\n")
    return True


def _model(chat: ChatSession, argument: str) -> bool:
    if not argument:
        print_note(chat.env, f"model: {chat.model} (switch with /model NAME)")
    else:
        chat.switch_model(argument)
    return True


def _save(chat: ChatSession, argument: str) -> bool:
    from localchat.history.records import ConversationNotFound, validate_name

    store = _require_history(chat)
    if not argument:
        raise UsageError("usage: /save NAME", "a name of letters, digits, '-', '_' or '.'")
    name = validate_name(argument)
    if chat.record is not None:
        try:
            chat.record = store.rename_conversation(chat.record.id, name)
        except ConversationNotFound:  # deleted meanwhile: the name goes to the next message's
            chat.forget_deleted_record()
    if chat.record is None:
        if store.find_conversation(name) is not None:
            raise UsageError(f"a conversation named {name!r} exists already",
                             f"pick another name, or /load {name}")
        chat.name = name
    print_note(chat.env, f"saved as {name}: resume it with `localchat run --session {name}`")
    return True


def _load(chat: ChatSession, argument: str) -> bool:
    store = _require_history(chat)
    if not argument:
        raise UsageError("usage: /load NAME", "see /history for the saved conversations")
    record = store.find_conversation(argument.removeprefix("#"))
    if record is None:
        raise LocalchatError(f"no conversation {argument!r} in the history",
                             "see /history for the saved conversations")
    if chat.record is not None and record.id == chat.record.id:
        print_note(chat.env, f"already in conversation {record.label}")
        return True
    chat.end_conversation()
    chat.resume(record)
    return True


def _history(chat: ChatSession, argument: str) -> bool:
    summaries = _require_history(chat).list_conversations(10)
    if not summaries:
        print_note(chat.env, "no saved conversations yet")
        return True
    current = chat.record.id if chat.record else None
    print_table(chat.env, ["", "ID", "NAME", "MODEL", "TURNS", "LAST MESSAGE", "UPDATED"], [
        ["*" if s.id == current else "", str(s.id), s.name or "-", model_label(s.model),
         str(s.turn_count), s.last_message or "-", format_when(s.updated_at)]
        for s in summaries], fit=("NAME", "MODEL", "LAST MESSAGE"))
    return True


def _require_history(chat: ChatSession) -> HistoryStore:
    if chat.store is None:
        raise UsageError("the history is off in this chat",
                         "start without --no-history (and without history = false in the config)")
    return chat.store


def _file(chat: ChatSession, argument: str) -> bool:
    if not argument:
        raise UsageError("usage: /file PATH", "the file goes with your next message")
    cost = chat.attach(argument)
    names = ", ".join(attachment.name for attachment in chat.attachments)
    print_note(chat.env, f"attached {argument} ({cost} tokens); with your next message: {names}")
    return True


def _schema(chat: ChatSession, argument: str) -> bool:
    from localchat.engine import grammar

    if not argument:
        current = chat.sampling.grammar
        print_note(chat.env, f"schema: {current.label if current else 'off'} (/schema SCHEMA, "
                             "/schema json, /schema off)")
    elif argument.lower() == "off":
        chat.set_grammar(None)
        print_note(chat.env, "replies are free text again")
    else:
        chosen = (grammar.json_grammar() if argument.lower() == "json"
                  else grammar.schema_grammar(argument))
        chat.set_grammar(chosen)
        shape = f" following {chosen.label}" if chosen.schema else ""
        print_note(chat.env, f"replies are JSON{shape} until /schema off")
    return True


def _preset(chat: ChatSession, argument: str) -> bool:
    from localchat.config import Config, find_preset
    from localchat.engine.grammar import output_grammar

    if not argument:
        names = ", ".join(sorted(chat.options.presets)) or "none in config.toml"
        raise UsageError("usage: /preset NAME", f"presets: {names}")
    preset = find_preset(Config(presets=chat.options.presets), argument)
    if preset.model and preset.model != chat.model:
        chat.switch_model(preset.model)
    later = []
    for name, value in preset.settings.items():
        setting = settings.get(name)
        if name == "system":
            _change_system(chat, value)
        elif name == "markdown":
            chat.markdown = bool(value)
        elif setting.scope == "sampling":
            chat.sampling = replace(chat.sampling, **{name: value})
        else:
            later.append(name)
    chat.set_grammar(output_grammar(preset.schema, preset.format, preset.grammar, preset.base,
                                    f"[presets.{preset.name}] "))
    for path in preset.files:
        chat.attach(path, preset.base)
    note = f"preset {preset.name}: {preset.summary or 'applied'}"
    if later:
        note += (f" ({', '.join(later)} apply when a model loads: start the chat with "
                 f"--preset {preset.name})")
    print_note(chat.env, note)
    return True


def _bye(chat: ChatSession, argument: str) -> bool:
    return False


COMMANDS: dict[str, Command] = {
    "/help": Command("/help", "this list", _help),
    "/set": Command("/set PARAM VALUE", f"change a setting: {', '.join(slash_settings())}",
                    _set),
    "/show": Command("/show", "the model and the current settings", _show),
    "/system": Command("/system TEXT", "set the system prompt (alone: show it)", _system),
    "/clear": Command("/clear", "start a new conversation, same model", _clear),
    "/undo": Command("/undo", "drop the last exchange", _undo),
    "/retry": Command("/retry", "generate the last reply again", _retry),
    "/context": Command("/context", "tokens used in the context window", _context),
    "/stats": Command("/stats", "the last reply: timings, prompt tokens reused and processed",
                      _stats),
    "/think": Command("/think on|off, /think budget N", "a thinking model's thinking: switch "
                      "it, or cap it at N tokens", _think),
    "/thinking": Command("/thinking", "show the last reply's thinking in full", _thinking),
    "/model": Command("/model NAME", "switch to another model, keep the conversation", _model),
    "/save": Command("/save NAME", "name this conversation, to resume it later", _save),
    "/load": Command("/load NAME", "continue a saved conversation", _load),
    "/history": Command("/history", "recent saved conversations", _history),
    "/file": Command("/file PATH", "attach a text file to your next message", _file),
    "/schema": Command("/schema SCHEMA", "replies as JSON: fields, a JSON Schema, json, or off",
                       _schema),
    "/preset": Command("/preset NAME", "use a preset of config.toml (model, system, settings)",
                       _preset),
    "/bye": Command("/bye, /exit", "leave (Ctrl-D too)", _bye),
}
ALIASES = {"/exit": "/bye", "/quit": "/bye", "/?": "/help"}


def completions(chat: ChatSession, text: str) -> list[str]:
    """What Tab may complete the last word of `text` to: commands, then their arguments."""
    if not text.startswith("/"):
        return []
    if " " not in text:
        return [name for name in [*COMMANDS, "/exit"] if name.startswith(text.lower())]
    command, _, rest = text.partition(" ")
    command = ALIASES.get(command.lower(), command.lower())
    *before, word = rest.split(" ")
    if not before:
        choices = _first_arguments(chat, command, word)
    elif command == "/set" and len(before) == 1 and _is_switch(before[0]):
        choices = ["on", "off"]
    else:
        choices = []
    return [choice for choice in choices if choice.startswith(word)]


def _is_switch(name: str) -> bool:
    setting = settings.find(name)
    return setting is not None and setting.slash and setting.kind == "bool"


def _first_arguments(chat: ChatSession, command: str, word: str) -> list[str]:
    if command == "/file":
        return _paths(word)
    if command == "/schema":
        return ["off", "json", *_paths(word)]
    if command == "/preset":
        return sorted(chat.options.presets)
    if command == "/set":
        return slash_settings()
    if command == "/model":
        return _model_names()
    if command == "/think":
        return ["on", "off", "budget"]
    if command == "/load" and chat.store is not None:
        try:
            return [s.name for s in chat.store.list_conversations(100) if s.name]
        except LocalchatError:
            return []
    return []


def _paths(word: str) -> list[str]:
    """Files and folders (with a trailing /) that complete the path `word`."""
    import os

    folder, _, start = word.rpartition("/")
    where = os.path.expanduser(folder + "/" if folder or word.startswith("/") else ".")
    try:
        names = sorted(entry.name + ("/" if entry.is_dir() else "")
                       for entry in os.scandir(where) if entry.name.startswith(start)
                       and (start.startswith(".") or not entry.name.startswith(".")))
    except OSError:
        return []
    prefix = word[: len(word) - len(start)]
    return [prefix + name for name in names][:200]


def _model_names() -> list[str]:
    try:
        from localchat.models.catalog import completion_names
        from localchat.models.store import list_local_models

        names = completion_names() + [model.name for model in list_local_models()]
    except LocalchatError:
        return []
    return sorted(set(names))
