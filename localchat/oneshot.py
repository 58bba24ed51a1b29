"""`localchat run MODEL PROMPT`: one prompt in, one streamed reply out, for people and pipes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from localchat.engine.loader import open_engine
from localchat.engine.local import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.engine.reasoning import REASONING
from localchat.errors import ExitStatus, LocalchatError, UsageError
from localchat.render import (
    Environment,
    PlainStream,
    ThinkingView,
    context_note,
    format_stats,
    print_json,
    print_note,
    read_piped_input,
    stats_record,
)

if TYPE_CHECKING:
    from localchat.engine.protocol import GenerationStats
    from localchat.engine.remote import RemoteOptions
    from localchat.history.records import HistoryStore


@dataclass(frozen=True)
class Request:
    """Everything one run needs, already merged from flags and config."""

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


def compose_prompt(piped: str | None, prompt: str | None) -> str:
    """Piped text first, then the prompt, separated by a blank line."""
    parts = [part.strip("\n") for part in (piped, prompt) if part and part.strip()]
    return "\n\n".join(parts)


def run_once(request: Request, env: Environment) -> int:
    """Generate one reply to the prompt; return the exit status."""
    text = compose_prompt(read_piped_input(env), request.prompt)
    if not text:
        raise UsageError(
            "nothing to send: the prompt is empty",
            'give a PROMPT, e.g. localchat run MODEL "hello", or pipe text on stdin',
        )
    engine = open_engine(request)
    if request.verbose:
        info = engine.info
        flash_attn = getattr(info, "flash_attn", None)  # a remote server does not say
        flash = "" if flash_attn is None else (
            " · flash attention" if flash_attn else " · no flash attention")
        threads = f" · {info.threads} threads" if info.threads is not None else ""
        print_note(env, f"model {info.model_path} · ctx {info.n_ctx}{threads} · "
                        f"{info.backend}{flash} · chat template {info.chat_format} "
                        f"({info.chat_format_source})")
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": text})
    recording = start_recording(request, env, text) if request.history else None
    sink = None if request.json_output else PlainStream(env.stdout)
    thinking = ThinkingView(env, request.show_thinking and not request.json_output) \
        if not request.json_output else None
    pieces: list[str] = []
    thoughts: list[str] = []
    failure: LocalchatError | None = None
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
    if recording:
        finish_recording(recording, env, "".join(pieces), stats, "".join(thoughts))
    if sink:
        sink.finish()
    if stats is None or (failure is not None and not pieces):
        if failure is not None:  # nothing arrived: the error alone says it
            raise failure
        return ExitStatus.INTERRUPTED  # interrupted before the prompt was even tokenized
    if request.json_output:  # what arrived, marked interrupted, as with Ctrl-C
        print_json(env, stats_record("".join(pieces), engine.info, stats, request.model,
                                     "".join(thoughts)))
    elif failure is None and (request.verbose or stats.finish_reason == "interrupted"):
        print_note(env, format_stats(engine.info, stats))
    if failure is not None:
        raise failure  # then the one-line error on stderr, exit 1
    if stats.finish_reason == "context":
        print_note(env, context_note(engine.info, stats))
    if stats.finish_reason == "thinking" and not request.json_output:
        print_note(env, thinking_note(stats))
    return ExitStatus.INTERRUPTED if stats.finish_reason == "interrupted" else ExitStatus.OK


def thinking_note(stats: GenerationStats) -> str:
    """Why there is no answer: the tokens ran out while the model was still thinking."""
    return (f"note: the model was still thinking when the reply reached its limit "
            f"({stats.reasoning_tokens} of {stats.completion_tokens} tokens were thinking): no "
            "answer; raise --max-tokens (it counts the thinking too) or set --think-budget")


# Recording the exchange in the history: the user's message is committed before generation, the
# reply when it ends, finished or interrupted. History never breaks a run: any failure is one
# note on stderr and the run goes on without it.


@dataclass(frozen=True)
class Recording:
    """An open history and the conversation this run is written to."""

    store: HistoryStore
    conversation_id: int


def start_recording(request: Request, env: Environment, text: str) -> Recording | None:
    """Start a conversation holding the user's message; None (after a note) if history fails."""
    from localchat.history.records import open_history

    try:
        store = open_history()
    except LocalchatError as exc:
        _history_note(env, "not saved to the history", exc)
        return None
    try:
        conversation = store.create_conversation(
            request.model, request.system, settings={"mode": "run", **asdict(request.sampling)})
        store.add_message(conversation.id, "user", text)
    except LocalchatError as exc:
        store.close()
        _history_note(env, "not saved to the history", exc)
        return None
    return Recording(store, conversation.id)


def finish_recording(recording: Recording, env: Environment, reply: str,
                     stats: GenerationStats | None, reasoning: str = "") -> None:
    """Commit the reply (its thinking apart) with its token count and timings, then close the
    history."""
    try:
        recording.store.add_message(
            recording.conversation_id, "assistant", reply, reasoning=reasoning or None,
            token_count=stats.completion_tokens if stats else None,
            timings=asdict(stats) if stats else None,
            interrupted=stats is None or stats.finish_reason == "interrupted",
        )
    except LocalchatError as exc:
        _history_note(env, "the reply was not saved to the history", exc)
    finally:
        recording.store.close()


def _history_note(env: Environment, what: str, error: LocalchatError) -> None:
    hint = f" ({error.hint})" if error.hint else ""
    print_note(env, f"note: {what}: {error.message}{hint}")
