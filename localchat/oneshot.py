"""`localchat run MODEL PROMPT`: one prompt in, one streamed reply out, for people and pipes.

The user message is the attached files (in order, fenced and named), then piped stdin, then the
prompt. With `--continue` or `--session` the reply continues a saved conversation, whose KV
snapshot is loaded so only the new tokens are processed; every one-shot conversation's snapshot
is saved for the next `-c`. A long fixed prefix (system prompt, preset, leading files) gets a
snapshot of its own, so the next one-shot that starts the same way begins warm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from localchat.chat.attachments import Attachment, FileRef, check_room, message_with, read_files
from localchat.chat.conversation import Conversation, Message, fit_to_window, messages_for_model
from localchat.engine.loader import open_engine
from localchat.engine.local import LocalEngine
from localchat.engine.options import DEFAULT_CONTEXT, EngineOptions
from localchat.engine.protocol import Sampling
from localchat.engine.reasoning import REASONING
from localchat.errors import ExitStatus, LocalchatError, UsageError
from localchat.render import (
    Environment,
    PlainStream,
    ThinkingView,
    context_note,
    format_stats,
    print_error,
    print_json,
    print_note,
    read_piped_input,
    stats_record,
)

if TYPE_CHECKING:
    from localchat.engine.grammar import ReplyMismatch
    from localchat.engine.protocol import Engine, GenerationStats
    from localchat.engine.remote import RemoteOptions
    from localchat.history.records import ConversationRecord, HistoryStore

# A fixed prefix shorter than this is cheaper to process than to snapshot and load.
PREFIX_MIN_TOKENS = 256
REPLY_ROOM = 512  # tokens kept for the reply when --max-tokens does not say (as in the chat)
REMOTE_ROOM_TOKENS = 1 << 20  # a server's window is unknown before it answers


@dataclass(frozen=True)
class Request:
    """Everything one run needs, already merged from flags, preset and config."""

    model: str
    prompt: str | None
    system: str | None
    sampling: Sampling
    engine: EngineOptions | None  # None with `remote`
    json_output: bool = False
    verbose: bool = False
    remote: RemoteOptions | None = None  # --endpoint: an OpenAI-compatible server instead
    history: bool = False  # record the exchange in the history database
    show_thinking: bool = False  # --show-thinking: a thinking model's thinking on stderr
    files: tuple[FileRef, ...] = ()  # -f, after the preset's
    conversation: ConversationRecord | None = None  # --continue / --session: the one to continue
    session: str | None = None  # --session NAME that does not exist yet: created by this run
    preset: str | None = None  # --preset NAME, recorded with the conversation
    snapshot_cap_bytes: int | None = None  # config.toml snapshot_cap_mb
    settings: dict[str, Any] = field(default_factory=dict, compare=False)  # for the history


def compose_prompt(piped: str | None, prompt: str | None) -> str:
    """Piped text first, then the prompt, separated by a blank line."""
    parts = [part.strip("\n") for part in (piped, prompt) if part and part.strip()]
    return "\n\n".join(parts)


def run_once(request: Request, env: Environment) -> int:
    """Generate one reply to the prompt; return the exit status."""
    reads_stdin = any(ref.argument == "-" for ref in request.files)
    window = (request.engine.n_ctx or DEFAULT_CONTEXT) if request.engine else REMOTE_ROOM_TOKENS
    attachments = read_files(request.files, env.stdin, room_tokens=window)  # before any load
    for attachment in attachments:
        if attachment.note:
            print_note(env, f"note: {attachment.note}")
    text = compose_prompt(None if reads_stdin else read_piped_input(env), request.prompt)
    if not text and not attachments:
        raise UsageError(
            "nothing to send: the prompt is empty",
            'give a PROMPT, e.g. localchat run MODEL "hello", or pipe text on stdin',
        )
    grammar = request.sampling.grammar
    instruction = grammar.instruction() if grammar else None
    if instruction:
        text = f"{text}\n\n{instruction}" if text else instruction
    engine = open_engine(request)
    try:
        return _run(request, env, engine, attachments, text)
    finally:
        engine.close()


def _run(request: Request, env: Environment, engine: Engine, attachments: list[Attachment],
         text: str) -> int:
    if request.verbose:
        _describe(env, engine, request.sampling.draft)
    if request.sampling.grammar is not None and isinstance(engine, LocalEngine):
        from localchat.engine.grammar_sampler import without_thinking

        engine.check_grammar(request.sampling.grammar)
        request = replace(request, sampling=without_thinking(engine.thinking, request.sampling))
    system = request.system
    if request.conversation is not None and request.system is None:
        system = request.conversation.system_prompt
    prompt = _Prompt(system, attachments, text)
    reply_room = min(request.sampling.max_tokens or REPLY_ROOM, engine.n_ctx // 4)
    costs = check_room(attachments, lambda k: engine.count_tokens(prompt.messages(k)),
                       engine.n_ctx - reply_room)
    if request.verbose:
        for attachment, cost in zip(attachments, costs, strict=True):
            print_note(env, f"attached {attachment.name}: {cost} tokens")
    store = _open_store(request, env)
    try:
        messages = prompt.messages()  # too long alone: the engine says so, with its hint
        if request.conversation is not None:  # earlier exchanges go first when they must
            fit = fit_to_window(prompt.conversation(store, request.conversation),
                                engine.count_tokens, engine.n_ctx, reply_room)
            if fit.dropped_exchanges:
                print_note(env, f"dropped the oldest {fit.dropped_exchanges} exchange(s) to fit "
                                f"the {engine.n_ctx}-token context window")
            messages = messages_for_model(fit.conversation)
        warm = _warm_start(request, env, engine, store, prompt, messages)
        recording = _start_recording(request, env, store, prompt.user_message) if store else None
        return _generate(request, env, engine, messages, warm, recording,
                         [{"name": a.name, "bytes": a.size_bytes, "tokens": cost}
                          for a, cost in zip(attachments, costs, strict=True)])
    finally:
        if store is not None:
            store.close()


@dataclass(frozen=True)
class _Prompt:
    """The new user message (files, then text) with the system prompt, as messages."""

    system: str | None
    attachments: list[Attachment]
    text: str

    @property
    def user_message(self) -> str:
        return message_with(self.attachments, self.text)

    def messages(self, files: int | None = None, text: str | None = None) -> list[dict[str, str]]:
        """The first `files` attachments (all by default) and `text` (the real one by default)."""
        chosen = self.attachments if files is None else self.attachments[:files]
        content = message_with(chosen, self.text if text is None else text)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": content}]

    def conversation(self, store: HistoryStore | None,
                     record: ConversationRecord | None) -> Conversation:
        earlier: tuple[Message, ...] = ()
        if store is not None and record is not None:
            earlier = tuple(Message(m.role, m.content, m.interrupted, m.reasoning)
                            for m in store.messages(record.id) if m.role != "system")
        return Conversation(self.system, (*earlier, Message("user", self.user_message)))


@dataclass
class _Warm:
    """What was loaded before the prompt was processed, and the prefix to save afterwards."""

    snapshot_tokens: int = 0
    load_s: float = 0.0
    prefix: list[int] | None = None  # a fixed prefix with no snapshot yet: save it at the end


def _warm_start(request: Request, env: Environment, engine: Engine, store: HistoryStore | None,
                prompt: _Prompt, messages: list[dict[str, str]]) -> _Warm:
    """Load the conversation's snapshot (-c, --session), or the snapshot of the fixed prefix."""
    warm = _Warm()
    if store is None or not isinstance(engine, LocalEngine):
        return warm  # nothing is written without the history; a server keeps its own cache
    from localchat.history import snapshots

    started = time.perf_counter()
    if request.conversation is not None and len(messages) > len(prompt.messages()):
        result = snapshots.restore_snapshot(engine, store, request.conversation.id, messages)
    else:
        prefix = fixed_prefix(engine, prompt)
        if len(prefix) < PREFIX_MIN_TOKENS:
            return warm
        result = snapshots.restore_prefix_snapshot(engine, store, prefix)
        warm.prefix = None if result.restored else prefix
    warm.load_s = time.perf_counter() - started if result.restored else 0.0
    warm.snapshot_tokens = result.reused_tokens
    if request.verbose:
        print_note(env, result.note)
    return warm


def fixed_prefix(engine: LocalEngine, prompt: _Prompt) -> list[int]:
    """The prompt's tokens that do not depend on the text after the files: the tokens it shares
    with the same prompt holding other texts (whatever the chat template and tokenizer do)."""
    tokens = engine.tokenize_messages(prompt.messages())
    for other in ("x", "Y\n"):
        alternative = engine.tokenize_messages(prompt.messages(text=other))
        shared = 0
        for a, b in zip(tokens, alternative, strict=False):
            if a != b:
                break
            shared += 1
        tokens = tokens[:shared]
    return tokens


def _generate(request: Request, env: Environment, engine: Engine,
              messages: list[dict[str, str]], warm: _Warm, recording: Recording | None,
              files: list[dict[str, Any]]) -> int:
    sink = None if request.json_output else PlainStream(env.stdout)
    thinking = ThinkingView(env, request.show_thinking and not request.json_output) \
        if not request.json_output else None
    pieces: list[str] = []
    thoughts: list[str] = []
    failure: LocalchatError | None = None
    inexact = getattr(engine.info, "inexact_drafts", None)  # the reply may measure otherwise
    stream = engine.stream_parts(messages, request.sampling)
    try:
        for part in stream:
            if part.kind == REASONING:
                thoughts.append(part.text)
                if thinking:
                    thinking.feed(part.text, part.tokens)
                continue
            if thinking:
                thinking.finish()
            pieces.append(part.text)
            if sink:
                sink.feed(part.text)
    except KeyboardInterrupt:
        stream.close()
    except LocalchatError as exc:  # a remote stream that broke off: keep what arrived
        failure = exc
    if thinking:
        thinking.finish()
    stats = engine.last_stats
    reply, reasoning = "".join(pieces), "".join(thoughts)
    if sink:
        sink.finish()
    if recording:
        _finish_recording(recording, env, reply, stats, reasoning)
        if stats is not None and failure is None:
            _save_snapshots(request, env, engine, recording, warm)
    if stats is None or (failure is not None and not pieces):
        if failure is not None:  # nothing arrived: the error alone says it
            raise failure
        return ExitStatus.INTERRUPTED  # interrupted before the prompt was even tokenized
    parsed, mismatch = _parse(request, reply, stats) if failure is None else (None, None)
    if request.json_output:  # what arrived, marked interrupted, as with Ctrl-C
        record = stats_record(reply, engine.info, stats, request.model, reasoning)
        record.update(snapshot_tokens=warm.snapshot_tokens, snapshot_load_s=round(warm.load_s, 4))
        if files:
            record["files"] = files
        if recording:
            record["conversation"] = recording.label
        if request.sampling.grammar is not None and request.sampling.grammar.is_json:
            record["parsed"] = parsed
        print_json(env, record)
    elif failure is None and (request.verbose or stats.finish_reason == "interrupted"):
        print_note(env, format_stats(engine.info, stats))
        measured = getattr(engine.info, "inexact_drafts", None)
        if request.verbose and measured != inexact:
            print_note(env, f"drafts stopped (--draft auto): {measured}")
    if failure is not None:
        raise failure  # then the one-line error on stderr, exit 1
    if stats.finish_reason == "context":
        print_note(env, context_note(engine.info, stats))
    if stats.finish_reason == "thinking" and not request.json_output:
        print_note(env, thinking_note(stats))
    if stats.finish_reason == "interrupted":
        return ExitStatus.INTERRUPTED
    if mismatch is not None:
        print_error(env, mismatch)
        return mismatch.exit_status
    return ExitStatus.OK


def _parse(request: Request, reply: str,
           stats: GenerationStats) -> tuple[Any, ReplyMismatch | None]:
    """The reply as JSON when the grammar promised JSON: (value, None) or (None, the error)."""
    grammar = request.sampling.grammar
    if grammar is None or not grammar.is_json:
        return None, None
    from localchat.engine.grammar import ReplyMismatch, parse_reply

    try:
        return parse_reply(grammar, reply, stats.finish_reason), None
    except ReplyMismatch as exc:
        return None, exc


def _describe(env: Environment, engine: Engine, draft: str) -> None:
    info = engine.info
    flash_attn = getattr(info, "flash_attn", None)  # a remote server does not say
    flash = "" if flash_attn is None else (
        " · flash attention" if flash_attn else " · no flash attention")
    threads = f" · {info.threads} threads" if info.threads is not None else ""
    cache = getattr(info, "cache_type", None)  # a remote server does not say
    kv = f" · {cache} KV cache" if cache else ""
    print_note(env, f"model {info.model_path} · ctx {info.n_ctx}{threads} · "
                    f"{info.backend}{flash}{kv} · chat template {info.chat_format} "
                    f"({info.chat_format_source})")
    note = draft_note(draft, getattr(info, "inexact_drafts", None))
    if note and isinstance(engine, LocalEngine):
        print_note(env, note)


def draft_note(draft: str, inexact: str | None) -> str | None:
    """What --draft does on this engine, when it is not simply what was asked."""
    from localchat.engine.speculative import drafts

    if not inexact or draft == "off":
        return None
    if drafts(draft, inexact):
        return f"drafts on (--draft {draft}), and the text may differ from --draft off: {inexact}"
    return f"drafts off (--draft {draft}): {inexact}; --draft ngram drafts anyway"


def thinking_note(stats: GenerationStats) -> str:
    """Why there is no answer: the tokens ran out while the model was still thinking."""
    return (f"note: the model was still thinking when the reply reached its limit "
            f"({stats.reasoning_tokens} of {stats.completion_tokens} tokens were thinking): no "
            "answer; raise --max-tokens (it counts the thinking too) or set --think-budget")


# Recording the exchange in the history: the user's message is committed before generation, the
# reply when it ends, finished or interrupted. History never breaks a run: any failure is one
# note on stderr and the run goes on without it. Snapshots are written after the reply is out.


@dataclass(frozen=True)
class Recording:
    """An open history and the conversation this run is written to."""

    store: HistoryStore
    conversation_id: int
    label: str


def _open_store(request: Request, env: Environment) -> HistoryStore | None:
    if not request.history:
        return None
    from localchat.history.records import open_history

    try:
        return open_history()
    except LocalchatError as exc:
        if request.conversation is not None or request.session is not None:
            raise  # the conversation asked for cannot be continued without it
        _history_note(env, "not saved to the history", exc)
        return None


def _start_recording(request: Request, env: Environment, store: HistoryStore,
                     text: str) -> Recording | None:
    """Add the user's message to the conversation (a new one unless continuing)."""
    try:
        record = request.conversation
        if record is None:
            settings = {"mode": "run", **request.sampling.record(), **request.settings}
            record = store.create_conversation(request.model, request.system,
                                               settings=settings, name=request.session)
        elif request.system is not None and request.system != record.system_prompt:
            record = store.set_system_prompt(record.id, request.system)
        store.add_message(record.id, "user", text)
    except LocalchatError as exc:
        _history_note(env, "not saved to the history", exc)
        return None
    return Recording(store, record.id, record.label)


def _finish_recording(recording: Recording, env: Environment, reply: str,
                      stats: GenerationStats | None, reasoning: str = "") -> None:
    """Commit the reply (its thinking apart) with its token count and timings."""
    from dataclasses import asdict

    try:
        recording.store.add_message(
            recording.conversation_id, "assistant", reply, reasoning=reasoning or None,
            token_count=stats.completion_tokens if stats else None,
            timings=asdict(stats) if stats else None,
            interrupted=stats is None or stats.finish_reason == "interrupted",
        )
    except LocalchatError as exc:
        _history_note(env, "the reply was not saved to the history", exc)


def _save_snapshots(request: Request, env: Environment, engine: Engine, recording: Recording,
                    warm: _Warm) -> None:
    """The conversation's snapshot, for the next -c; then the fixed prefix's, if it is new (the
    cache is cut to the prefix for that, so it comes last)."""
    if not isinstance(engine, LocalEngine):
        return
    from localchat.history import snapshots

    cap = snapshots.DEFAULT_CAP_BYTES if request.snapshot_cap_bytes is None \
        else request.snapshot_cap_bytes
    notes = [snapshots.save_snapshot(engine, recording.store, recording.conversation_id,
                                     cap).note]
    if warm.prefix is not None:
        notes.append(snapshots.save_prefix_snapshot(engine, recording.store, warm.prefix,
                                                    cap).note)
    if request.verbose:
        for note in notes:
            print_note(env, note)


def _history_note(env: Environment, what: str, error: LocalchatError) -> None:
    hint = f" ({error.hint})" if error.hint else ""
    print_note(env, f"note: {what}: {error.message}{hint}")


def find_conversation(session: str | None, continue_last: bool,
                      env: Environment) -> ConversationRecord | None:
    """The conversation `--session NAME` or `--continue` names; None for a new one (with a note
    when --continue finds nothing to continue)."""
    from localchat.history.database import default_history_path
    from localchat.history.records import open_history, validate_name

    if session is not None:
        validate_name(session)
    if not default_history_path().exists():
        found = None
    else:
        with open_history() as store:
            found = (store.find_conversation(session) if session is not None
                     else store.last_conversation())
    if found is None and continue_last:
        print_note(env, "no conversation to continue: starting a new one")
    return found
