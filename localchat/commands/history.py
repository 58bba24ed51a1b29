"""`localchat history`: the saved conversations, listed, shown, searched, exported, removed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from localchat import render
from localchat.commands.options import env_of
from localchat.errors import LocalchatError
from localchat.render import Environment
from localchat.table_cells import emphasis

if TYPE_CHECKING:  # for annotations only: `localchat --help` imports none of these
    from localchat.history.records import ConversationRecord, HistoryStore


app = typer.Typer(help="Saved conversations; with no command, the most recent ones.",
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})
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


@app.callback(invoke_without_command=True)
def history_list(ctx: typer.Context, limit: LimitOption = 20) -> None:
    """Recent conversations, newest first (the default when no command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    env = env_of(ctx)
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


@app.command("show")
def history_show(context: typer.Context, conversation: ConversationArgument) -> None:
    """The whole transcript of a conversation."""
    env = env_of(context)
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


@app.command("search")
def history_search(context: typer.Context, 
    words: Annotated[list[str], typer.Argument(
        metavar="WORDS", help="Words to find (all of them, any form).")],
    limit: LimitOption = 20,
) -> None:
    """Full-text search over everything said, best match first."""
    env, text = env_of(context), " ".join(words)
    with _history() as store:
        hits = store.search(text, limit) if store else []
    if not hits:
        render.print_note(env, f"nothing in the history matches {text!r}")
        return
    render.print_table(env, ["ID", "NAME", "ROLE", "WHEN", "MATCH"], [
        [str(hit.conversation_id), hit.conversation_name or "-", hit.role,
         render.format_when(hit.created_at), emphasis(hit.snippet, hit.matches)]
        for hit in hits], fit=("NAME", "MATCH"))


@app.command("export")
def history_export(context: typer.Context, 
    conversation: ConversationArgument,
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT",
                                        help="md or json.")] = "md",
) -> None:
    """Print a conversation as Markdown or JSON."""
    env = env_of(context)
    with _history() as store:
        store, record = _conversation(store, conversation)
        text = store.export_conversation(record.id, format)
    env.stdout.write(text.rstrip("\n") + "\n")


@app.command("rm")
def history_rm(context: typer.Context, conversation: ConversationArgument) -> None:
    """Delete a conversation, its messages and its KV-cache snapshots."""
    env = env_of(context)
    with _history() as store:
        store, record = _conversation(store, conversation)
        removed = store.delete_conversation(record.id)
    snapshots = f" and {len(removed)} snapshot file(s)" if removed else ""
    render.print_note(env, f"removed conversation {conversation}{snapshots}")


