"""The interactive chat: a prompt-toolkit loop around one `ChatSession`.

The session (a turn, the history, switching models) is in `session`; the slash commands are in
`slash_commands`, so this file stays about the loop itself.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from localchat import paths
from localchat.chat.session import BLOCK, CONTINUATION, PROMPT, ChatSession, ReplOptions
from localchat.errors import ExitStatus, LocalchatError, UsageError
from localchat.render import Environment, print_error, print_note

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import CompleteEvent, Completer
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import History
    from prompt_toolkit.input import Input
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
    from prompt_toolkit.output import Output

    from localchat.engine.protocol import Engine
    from localchat.history.records import ConversationRecord, HistoryStore
    from localchat.oneshot import Request


def run_repl(request: Request, env: Environment, options: ReplOptions, *,
             engine: Engine | None = None, pt_input: Input | None = None,
             pt_output: Output | None = None) -> int:
    """Chat until Ctrl-D or /bye; return the exit status. A given `engine` stays the caller's."""
    from localchat.engine.loader import open_engine

    store = open_store(request, options, env)
    try:
        record = find_resumed(store, options, env) if store is not None else None
        chat = ChatSession(request, env, options, store, engine or open_engine(request),
                           owns_engine=engine is None)
        try:
            if record is not None:
                chat.resume(record)
            else:
                chat.name = options.session
                chat.refresh_usage()
            for ref in request.files:  # -f and the preset's files go with the first message
                chat.attach(ref.argument, ref.base)
            print_note(env, f"{chat.model} · context {chat.engine.n_ctx} tokens · /help for "
                            "commands, Ctrl-D to leave")
            chat_loop(chat, prompt_session(chat, pt_input, pt_output))
            chat.end_conversation()
        finally:
            chat.close_engine()
    finally:
        if store is not None:
            store.close()
    return ExitStatus.OK


def open_store(request: Request, options: ReplOptions, env: Environment) -> HistoryStore | None:
    """The history database, or None when history is off or (after a note) cannot be opened."""
    wants = options.session is not None or options.resume_last
    if not request.history:
        if wants:
            raise UsageError("--session and --continue need the history, which is off",
                             "drop --no-history (or set history = true in the config)")
        return None
    if options.session is not None and options.resume_last:
        raise UsageError("--session and --continue cannot be used together",
                         "--session NAME picks a conversation; --continue picks the last one")
    if options.session is not None:
        from localchat.history.records import validate_name

        validate_name(options.session)
    from localchat.history.records import open_history

    try:
        return open_history()
    except LocalchatError as exc:
        if wants:
            raise
        hint = f" ({exc.hint})" if exc.hint else ""
        print_note(env, f"note: this chat is not saved to the history: {exc.message}{hint}")
        return None


def find_resumed(store: HistoryStore, options: ReplOptions,
                 env: Environment) -> ConversationRecord | None:
    """The conversation --session or --continue asks for, or None for a new one."""
    if options.session is not None:
        return store.find_conversation(options.session)
    if options.resume_last:
        record = store.last_conversation()
        if record is None:
            print_note(env, "no conversation to continue: starting a new one")
        return record
    return None


def chat_loop(chat: ChatSession, session: PromptSession[str]) -> None:
    """Read, run, repeat: slash commands, messages, and the keys that stop things."""
    from localchat.chat.slash_commands import run_command

    while True:
        try:
            line = clean_text(session.prompt(PROMPT))
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            return
        try:
            if line.lstrip().startswith("/"):  # a \"\"\" block is always a message
                if not run_command(chat, line.strip()):
                    return
            elif line.strip():
                chat.send(message_text(line))
        except LocalchatError as exc:
            print_error(chat.env, exc)
        except KeyboardInterrupt:
            print_note(chat.env, "interrupted")


def prompt_session(chat: ChatSession, pt_input: Input | None = None,
                   pt_output: Output | None = None) -> PromptSession[str]:
    """The prompt: input history, completion, multi-line keys and the bottom toolbar."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    history: History = InMemoryHistory()
    if chat.request.history:  # --no-history means nothing on disk, typed lines included
        path = paths.data_dir() / "input_history"
        try:
            paths.ensure_private_dir(path.parent)
            os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
            history = _input_history(str(path))
        except OSError:
            pass  # a read-only or full data dir: lines are remembered for this chat only
    if pt_output is None and not chat.env.stdout_isatty:
        from prompt_toolkit.output import create_output

        pt_output = create_output(stdout=chat.env.stderr)  # the prompt goes where the person is
    return PromptSession(
        history=history, completer=_completer(chat), complete_while_typing=False,
        key_bindings=_key_bindings(), bottom_toolbar=chat.toolbar,
        prompt_continuation=CONTINUATION, input=pt_input, output=pt_output,
    )


def _input_history(path: str) -> History:
    """Typed lines kept in `path`; a line that cannot be written (a full disk) is only lost."""
    from prompt_toolkit.history import FileHistory

    class InputHistory(FileHistory):
        def store_string(self, string: str) -> None:
            # prompt-toolkit would print the traceback and stop at "Press ENTER to continue".
            with contextlib.suppress(OSError):
                super().store_string(string)

    return InputHistory(path)


def _key_bindings() -> KeyBindings:
    from prompt_toolkit.application import get_app
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")  # Esc-Enter, and Alt-Enter (terminals send the same)
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    @bindings.add("enter", filter=Condition(lambda: block_is_open(get_app().current_buffer.text)))
    def _block_line(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return bindings


def _completer(chat: ChatSession) -> Completer:
    from prompt_toolkit.completion import Completer, Completion

    from localchat.chat.slash_commands import completions

    class SlashCompleter(Completer):
        def get_completions(self, document: Document,
                            complete_event: CompleteEvent) -> Iterable[Completion]:
            text = document.text_before_cursor
            word = text.rsplit(" ", 1)[-1]
            for candidate in completions(chat, text):
                yield Completion(candidate, start_position=-len(word))

    return SlashCompleter()


def block_is_open(text: str) -> bool:
    """True while a `\"\"\"` block has been opened and not yet closed."""
    stripped = text.strip()
    return stripped.startswith(BLOCK) and (len(stripped) < 6 or not stripped.endswith(BLOCK))


def message_text(line: str) -> str:
    """What to send: a `\"\"\"` block without its quotes and edge blank lines, else the line."""
    stripped = line.strip()
    if not stripped.startswith(BLOCK):
        return stripped
    inner = stripped[3:-3] if len(stripped) >= 6 and stripped.endswith(BLOCK) else stripped[3:]
    return re.sub(r"^\s*\n|\n\s*$", "", inner)  # blank edge lines go, indentation stays


def clean_text(text: str) -> str:
    """Input with undecodable bytes (kept by the terminal as surrogates) as U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")
