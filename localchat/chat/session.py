"""One live chat: engine, conversation, settings, and where it is saved.

`ChatSession` runs a turn: fit the conversation to the window, stream the reply through the
renderer, keep and save it. The prompt loop is in `repl`, the slash commands in `slash_commands`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from localchat.chat.conversation import Conversation, Message, fit_to_window, messages_for_model
from localchat.engine.reasoning import REASONING
from localchat.errors import LocalchatError, UsageError
from localchat.history.records import ConversationNotFound
from localchat.history.snapshots import DEFAULT_CAP_BYTES
from localchat.render import (
    Environment,
    PlainStream,
    ThinkingView,
    context_note,
    format_rate,
    print_note,
    terminal_safe,
)

if TYPE_CHECKING:
    from rich.console import Console

    from localchat.chat.attachments import Attachment
    from localchat.chat.markdown_stream import MarkdownStream
    from localchat.config import Preset
    from localchat.engine.grammar import OutputGrammar
    from localchat.engine.protocol import Engine, GenerationStats, Sampling
    from localchat.history.records import ConversationRecord, HistoryStore
    from localchat.oneshot import Request


# /model NAME: a name in, (the name to show and record, a loaded engine) out. The CLI builds it,
# because turning a name into a file on disk (and maybe a download) is the CLI's job.
ModelLoader = Callable[[str], "tuple[str, Engine]"]
REPLY_ROOM = 512  # tokens kept free for the reply when --max-tokens does not say
PROMPT, CONTINUATION = ">>> ", "... "
BLOCK = '"""'


@dataclass(frozen=True)
class ReplOptions:
    """What the chat needs beyond a one-shot `Request`."""

    markdown: bool = True
    session: str | None = None  # --session NAME: create or resume this named conversation
    resume_last: bool = False  # --continue
    load_model: ModelLoader | None = None  # None: /model cannot switch (e.g. a remote server)
    snapshot_cap_bytes: int = DEFAULT_CAP_BYTES  # config.toml's snapshot_cap_mb: all snapshots
    presets: Mapping[str, Preset] = field(default_factory=dict)  # for /preset NAME


class ChatSession:
    """The live state of one chat: engine, conversation, settings, and where it is saved."""

    def __init__(self, request: Request, env: Environment, options: ReplOptions,
                 store: HistoryStore | None, engine: Engine, owns_engine: bool = True) -> None:
        self.request, self.env, self.options, self.store = request, env, options, store
        self.engine, self.owns_engine = engine, owns_engine  # owned: closed when the chat ends
        self.model = request.model
        self.sampling = request.sampling
        self.markdown = options.markdown
        self.conversation = Conversation(system=request.system)
        self.record: ConversationRecord | None = None  # created with the first saved message
        self.name: str | None = None  # the name a not-yet-saved conversation will get
        self.cache_is_current = False  # the KV cache holds this conversation (worth a snapshot)
        self.used_tokens = 0
        self.thought_s = 0.0  # how long the last reply thought
        self.attachments: list[Attachment] = []  # /file: they go with the next message
        self._console: Console | None = None

    # --- a turn ---------------------------------------------------------------------------

    def send(self, text: str) -> None:
        """One turn: fit the window, save the message, stream and keep the reply."""
        from localchat.chat.attachments import message_with

        engine = self.engine
        grammar = self.sampling.grammar
        instruction = grammar.instruction() if grammar else None
        text = message_with(self.attachments, f"{text}\n\n{instruction}" if instruction else text)
        fit = fit_to_window(self.conversation.add_user(text), engine.count_tokens,
                            engine.n_ctx, self.reply_room(),
                            getattr(engine.info, "n_ctx_train", None))
        if fit.dropped_exchanges:
            print_note(self.env, f"dropped the oldest {fit.dropped_exchanges} exchange(s) to fit "
                                 f"the {engine.n_ctx}-token context window")
        self.conversation = fit.conversation
        self.attachments = []
        self.save_message("user", text)
        self.reply()

    def reply(self) -> None:
        """Stream a reply to the conversation as it stands; Ctrl-C keeps the part shown."""
        engine = self.engine
        before = engine.last_stats
        pieces: list[str] = []
        thoughts: list[str] = []
        failure: LocalchatError | None = None
        thinking = ThinkingView(self.env, hint="/thinking shows it", console=self._rich_console())
        renderer = None
        stream = engine.stream_parts(messages_for_model(self.conversation), self._reply_sampling())
        try:
            for part in stream:
                if part.kind == REASONING:
                    thoughts.append(part.text)
                    thinking.feed(part.text, part.tokens)
                    continue
                if renderer is None:  # the answer begins: the thinking folds to one line
                    thinking.finish()
                    renderer = self._renderer()
                pieces.append(part.text)
                renderer.feed(part.text)
        except KeyboardInterrupt:
            stream.close()
        except LocalchatError as exc:  # a remote stream that broke off: keep what arrived
            failure = exc
        finally:
            thinking.finish()
            if renderer is not None:
                renderer.finish()
        self.cache_is_current = True
        self.thought_s = thinking.seconds
        stats = engine.last_stats if engine.last_stats is not before else None
        text, reasoning = "".join(pieces), "".join(thoughts)
        interrupted = failure is not None or stats is None or stats.finish_reason == "interrupted"
        if interrupted and not text and not reasoning:
            self.conversation = self.conversation.undo()
            self.with_history(lambda store, cid: store.delete_last_exchange(cid))
            if failure is None:
                print_note(self.env, "interrupted before the reply began: the message was not "
                                     "kept (press Up to get it back)")
        else:
            self.conversation = self.conversation.add_assistant(text, interrupted, reasoning)
            self.save_message("assistant", text, stats, interrupted, reasoning)
            if failure is None and interrupted:
                print_note(self.env, "interrupted: the partial reply is kept")
            elif stats is not None and stats.finish_reason == "context":
                print_note(self.env, context_note(engine.info, stats))
            elif stats is not None and stats.finish_reason == "thinking":
                print_note(self.env, "the reply ran out of tokens while still thinking: no "
                                     "answer (/set max_tokens counts the thinking too; try "
                                     "/think budget N)")
            self.env.stdout.write("\n")  # a blank line between exchanges
            self.env.stdout.flush()
        self.refresh_usage()
        if failure is not None:
            raise failure

    def reply_room(self) -> int:
        """Tokens kept free for the reply when fitting the conversation to the window."""
        return min(self.sampling.max_tokens or REPLY_ROOM, self.engine.n_ctx // 4)

    def refresh_usage(self) -> None:
        """Count the tokens the conversation takes now (for /context and the toolbar).

        A reply that filled the window counts with the next turn's opening too, which is more
        than the window holds: the usage shown stops at the window (the next turn makes room).
        """
        used = self.engine.count_tokens(messages_for_model(self.conversation))
        self.used_tokens = min(used, self.engine.n_ctx)

    # --- files, output shape and presets ---------------------------------------------------

    def attach(self, argument: str, base: Any = None) -> int:
        """Read a file for the next message (refused if it cannot fit); its cost in tokens."""
        from localchat.chat.attachments import check_room, message_with, read_attachment

        engine = self.engine
        room = engine.n_ctx - self.reply_room()
        attachment = read_attachment(argument, None, room_tokens=room, base=base)
        pending = [*self.attachments, attachment]
        before = messages_for_model(self.conversation)

        def count(new: int) -> int:  # the next message so far, with the new file or without
            content = message_with(pending[:len(self.attachments) + new], "")
            return engine.count_tokens([*before, {"role": "user", "content": content}])

        cost = check_room([attachment], count, room)[0]
        self.attachments = pending
        return cost

    def set_grammar(self, grammar: OutputGrammar | None) -> None:
        """Constrain the replies from now on (None: free text again)."""
        from localchat.engine.local import LocalEngine

        if grammar is not None and not isinstance(self.engine, LocalEngine):
            raise UsageError("a schema needs the local engine",
                             "the grammar sampler is llama.cpp's; this chat uses a server")
        sampling = replace(self.sampling, grammar=grammar)
        if isinstance(self.engine, LocalEngine) and grammar is not None:
            from localchat.engine.grammar_sampler import without_thinking

            self.engine.check_grammar(grammar)
            without_thinking(self.engine.thinking, sampling)  # refused here, not at the reply
        self.sampling = sampling

    def _reply_sampling(self) -> Sampling:
        """The sampling of a reply: with a schema on, a thinking model does not think."""
        from localchat.engine.local import LocalEngine

        if self.sampling.grammar is None or not isinstance(self.engine, LocalEngine):
            return self.sampling
        from localchat.engine.grammar_sampler import without_thinking

        return without_thinking(self.engine.thinking, self.sampling)

    def toolbar(self) -> str:
        """The bottom line: model, tokens used / context size, last decode speed."""
        engine = self.engine
        stats = engine.last_stats
        rate = format_rate(stats.decode_tokens_per_s if stats else None)
        label = self.model.rstrip("/").rsplit("/", 1)[-1]  # a path's file name, a repo's name
        return f" {label} · {self.used_tokens} / {engine.n_ctx} tokens · {rate}" \
               f"{self._thinking_status()}"

    def _thinking_status(self) -> str:
        """The toolbar's word on thinking: the switch, the budget, the last reply's thinking."""
        if getattr(self.engine, "thinking", None) is None:
            return ""
        sampling, last = self.sampling, self.conversation.messages[-1:]
        state = {True: "on", False: "off", None: "on"}[sampling.think]
        budget = f", budget {sampling.think_budget}" if sampling.think_budget is not None else ""
        stats = self.engine.last_stats
        thought = f" · thought {self.thought_s:.1f} s, {stats.reasoning_tokens} tokens" if (
            stats and stats.reasoning_tokens and last and last[0].reasoning) else ""
        return f" · thinking {state}{budget}{thought}"

    def _renderer(self) -> PlainStream | MarkdownStream:
        if not (self.markdown and self.env.stdout_isatty):
            return PlainStream(self.env.stdout)
        from localchat.chat.markdown_stream import MarkdownStream

        console = self._rich_console()
        assert console is not None  # stdout is a terminal
        return MarkdownStream(console)

    def _rich_console(self) -> Console | None:
        """One rich console for the chat's terminal (markdown, the thinking view); None in a
        pipe."""
        if self._console is None and self.env.stdout_isatty:
            from rich.console import Console

            self._console = Console(file=self.env.stdout)
        return self._console

    # --- the history ----------------------------------------------------------------------

    def save_message(self, role: str, text: str, stats: GenerationStats | None = None,
                     interrupted: bool = False, reasoning: str | None = None) -> None:
        """Commit one message, creating the conversation with the first; failures are a note.

        A conversation deleted meanwhile (`localchat history rm` in another terminal) is not an
        error: the chat goes on as a new conversation, which gets this exchange.
        """
        if self.store is None:
            return
        try:
            try:
                self._add_message(role, text, stats, interrupted, reasoning)
            except ConversationNotFound:
                if self.record is None:
                    raise
                gone = self.record.label
                self.record, self.name = None, None
                if role == "assistant":  # the question goes with its answer
                    question = next((m for m in reversed(self.conversation.messages)
                                     if m.role == "user"), None)
                    if question is not None:
                        self._add_message("user", question.content)
                self._add_message(role, text, stats, interrupted, reasoning)
                assert self.record is not None
                print_note(self.env, f"note: conversation {gone} was deleted from the history; "
                                     f"this chat goes on as conversation {self.record.label}")
        except LocalchatError as exc:
            self._history_failed(exc)

    def _add_message(self, role: str, text: str, stats: GenerationStats | None = None,
                     interrupted: bool = False, reasoning: str | None = None) -> None:
        assert self.store is not None
        if self.record is None:
            self.record = self.store.create_conversation(
                self.model, self.conversation.system, name=self.name,
                settings={"mode": "repl", **self.sampling.record()})
        self.store.add_message(
            self.record.id, role, text, token_count=stats.completion_tokens if stats else None,
            timings=asdict(stats) if stats else None, interrupted=interrupted,
            reasoning=reasoning or None)

    def with_history(self, action: Callable[[HistoryStore, int], object]) -> None:
        """Apply a change to the saved conversation, if there is one; failures are a note."""
        if self.store is None or self.record is None:
            return
        try:
            action(self.store, self.record.id)
        except ConversationNotFound:
            self.forget_deleted_record()
        except LocalchatError as exc:
            self._history_failed(exc)

    def forget_deleted_record(self) -> None:
        """The saved conversation was deleted: say so; the next message starts a new one."""
        assert self.record is not None
        print_note(self.env, f"note: conversation {self.record.label} was deleted from the "
                             "history; this chat goes on as a new conversation from the next "
                             "message")
        self.record, self.name, self.cache_is_current = None, None, False

    def _history_failed(self, error: LocalchatError) -> None:
        hint = f" ({error.hint})" if error.hint else ""
        print_note(self.env, f"note: not saved to the history: {error.message}{hint}")

    def resume(self, record: ConversationRecord) -> None:
        """Make `record` the live conversation, its KV cache restored from a snapshot if any."""
        assert self.store is not None
        stored = self.store.messages(record.id)
        self.conversation = Conversation(system=record.system_prompt, messages=tuple(
            Message(m.role, m.content, m.interrupted, m.reasoning)
            for m in stored if m.role != "system"))
        self.record, self.name, self.cache_is_current = record, record.name, False
        turns = sum(message.role == "user" for message in self.conversation.messages)
        print_note(self.env, f"continuing conversation {record.label} ({turns} turn(s))" + (
            f"; it was started with {record.model}" if record.model != self.model else ""))
        if self.conversation.messages:
            from localchat.history.snapshots import restore_snapshot

            result = restore_snapshot(self.engine, self.store, record.id,
                                      messages_for_model(self.conversation))
            self.cache_is_current = result.restored
            self._verbose_note(result.note)
            self._show_last_exchange()
        self.refresh_usage()

    def end_conversation(self) -> None:
        """Save the KV cache as the conversation's snapshot, so resuming it re-reads nothing."""
        if self.store is None or self.record is None or not self.cache_is_current:
            return
        from localchat.history.snapshots import save_snapshot

        keep_for = getattr(self.engine, "keep_cache_for", None)
        if keep_for is not None:  # a thinking model's last thinking is not what comes next
            keep_for([*messages_for_model(self.conversation), {"role": "user", "content": "?"}])
        self._verbose_note(save_snapshot(self.engine, self.store, self.record.id,
                                         cap_bytes=self.options.snapshot_cap_bytes).note)
        self.cache_is_current = False

    def start_new(self) -> None:
        """A new conversation with the same model and system prompt (/clear)."""
        self.end_conversation()
        self.conversation = self.conversation.cleared()
        self.record, self.name = None, None
        self.refresh_usage()

    def _show_last_exchange(self) -> None:
        terminal = self.env.stdout_isatty
        for message in self.conversation.messages[-2:]:
            lead = PROMPT if message.role == "user" else ""
            text = message.content.rstrip()
            self.env.stdout.write(f"{lead}{terminal_safe(text) if terminal else text}\n")
        self.env.stdout.write("\n")
        self.env.stdout.flush()

    def _verbose_note(self, text: str) -> None:
        if self.request.verbose:
            print_note(self.env, text)

    # --- the model ------------------------------------------------------------------------

    def switch_model(self, name: str) -> None:
        """Load model `name` and keep the conversation; on any failure the current one stays."""
        if self.options.load_model is None:
            raise UsageError("this chat cannot switch models",
                             "start another `localchat run MODEL` instead")
        print_note(self.env, f"loading {name}...")
        try:
            model, engine = self.options.load_model(name)
        except KeyboardInterrupt:
            print_note(self.env, f"loading interrupted: still using {self.model}")
            return
        except LocalchatError as exc:
            raise LocalchatError(f"{exc.message} (still using {self.model})", exc.hint) from exc
        except (OSError, MemoryError) as exc:  # a file or memory llama.cpp could not have
            raise LocalchatError(f"cannot load {name}: {exc} (still using {self.model})",
                                 "run with --debug for the traceback") from exc
        self.end_conversation()
        self.close_engine()
        self.engine, self.owns_engine, self.model = engine, True, model
        self.cache_is_current = False
        self.refresh_usage()
        print_note(self.env, f"now using {model} (context {engine.n_ctx} tokens); the "
                             "conversation is kept")

    def close_engine(self) -> None:
        """Free the engine if this chat loaded it."""
        if self.owns_engine:
            self.engine.close()
