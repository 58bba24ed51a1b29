"""Conversations as values, the context-window policy, and `/set` value parsing: no I/O."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from localchat import settings
from localchat.errors import ContextOverflowError, UsageError

# A callable that formats messages with the model's chat template and counts the tokens;
# `LocalEngine.count_tokens` is one.
TokenCounter = Callable[[list[dict[str, str]]], int]
SettingValue = float | int | bool | str | tuple[str, ...] | None


@dataclass(frozen=True)
class Message:
    """One message; `interrupted` marks a reply stopped by Ctrl-C (kept, and sent as is)."""

    role: str
    content: str
    interrupted: bool = False
    # A thinking model's thinking before this answer: kept and shown (/thinking), never sent
    # back, as these models' templates drop earlier turns' thinking themselves.
    reasoning: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown message role {self.role!r}")

    def as_dict(self) -> dict[str, str]:
        """The OpenAI-shaped dict the engines take."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """A system prompt and the user/assistant messages so far; every change returns a new value."""

    system: str | None = None
    messages: tuple[Message, ...] = ()

    def add_user(self, content: str) -> Conversation:
        """This conversation with a user message appended."""
        return replace(self, messages=(*self.messages, Message("user", content)))

    def add_assistant(self, content: str, interrupted: bool = False,
                      reasoning: str | None = None) -> Conversation:
        """This conversation with a reply appended; `interrupted` when the user stopped it."""
        reply = Message("assistant", content, interrupted, reasoning or None)
        return replace(self, messages=(*self.messages, reply))

    def undo(self) -> Conversation:
        """Drop the last exchange: the newest user message and any reply after it."""
        starts = _exchange_starts(self.messages)
        if not starts:
            raise UsageError("nothing to undo", "the conversation is empty")
        return replace(self, messages=self.messages[: starts[-1]])

    def without_last_reply(self) -> Conversation:
        """Drop the reply after the newest user message, so it can be generated again (/retry)."""
        end = len(self.messages)
        while end and self.messages[end - 1].role == "assistant":
            end -= 1
        if not end:
            raise UsageError("nothing to retry", "send a message first")
        return replace(self, messages=self.messages[:end])

    def with_system(self, text: str | None) -> Conversation:
        """This conversation with a new system prompt; empty text removes it."""
        return replace(self, system=text if text and text.strip() else None)

    def cleared(self) -> Conversation:
        """A new conversation that keeps the system prompt (a setting, not part of the chat)."""
        return Conversation(system=self.system)


@dataclass(frozen=True)
class FitResult:
    """What `fit_to_window` kept, how many old exchanges it dropped, and the prompt's size."""

    conversation: Conversation
    dropped_exchanges: int
    prompt_tokens: int


def messages_for_model(conversation: Conversation) -> list[dict[str, str]]:
    """The messages to send to an engine, the system prompt first when there is one."""
    head = [{"role": "system", "content": conversation.system}] if conversation.system else []
    return head + [message.as_dict() for message in conversation.messages]


def _overflow_hint(needed: int, n_ctx: int, n_ctx_train: int | None) -> str:
    """What to do about a message that cannot fit: a larger --ctx only while the model allows it."""
    suggestion = 1024 * math.ceil(needed / 1024)
    if n_ctx_train is None:
        return f"use --ctx {suggestion} or more if the model allows it, or send a shorter message"
    if n_ctx >= n_ctx_train:
        where = "at" if n_ctx == n_ctx_train else "past"
        return (f"send a shorter message: --ctx {n_ctx} is already {where} this model's trained "
                f"length ({n_ctx_train})")
    if suggestion > n_ctx_train:
        return (f"send a shorter message, or raise --ctx up to {n_ctx_train}, this model's "
                "trained length")
    return f"use --ctx {suggestion} or more (this model was trained on {n_ctx_train}), or " \
           "send a shorter message"


def fit_to_window(
    conversation: Conversation, count_tokens: TokenCounter, n_ctx: int, reserve: int,
    n_ctx_train: int | None = None,
) -> FitResult:
    """Drop the oldest whole exchanges until the prompt plus `reserve` fits in `n_ctx` tokens.

    Counts are real (template + tokenizer) because templates are not additive: per-message
    counts would miss BOS tokens, separators and default system prompts. So instead of one call
    per message we search: one call when everything fits (the usual turn), else one for the
    smallest prompt we may send and a binary search over how many exchanges to drop,
    2 + ceil(log2(exchanges)) calls in all. A trim goes down to half the window, not just under
    the limit, so the next several turns only append and the engine keeps reusing the KV cache
    of the shared prefix; trimming a little every turn would change the prefix every turn.
    Keep `result.conversation` as the live conversation for the same reason.
    """
    if n_ctx <= 0 or reserve < 0:
        raise ValueError(f"need n_ctx > 0 and reserve >= 0 (got {n_ctx}, {reserve})")
    budget = n_ctx - reserve
    full = count_tokens(messages_for_model(conversation))
    if full <= budget:
        return FitResult(conversation, 0, full)

    starts = _exchange_starts(conversation.messages)
    droppable = max(len(starts) - 1, 0)  # every exchange but the newest

    def drop(count: int) -> Conversation:
        return replace(conversation, messages=conversation.messages[starts[count] :])

    smallest = count_tokens(messages_for_model(drop(droppable))) if droppable else full
    if smallest > budget:
        raise ContextOverflowError(
            f"prompt is {smallest} tokens; the context window is {n_ctx} "
            f"with {reserve} reserved for the reply",
            _overflow_hint(smallest + reserve, n_ctx, n_ctx_train),
        )
    target = min(budget, n_ctx // 2)
    if smallest > target:
        return FitResult(drop(droppable), droppable, smallest)

    # Invariant: dropping `high` exchanges reaches the target, dropping `low` does not.
    low, high, high_tokens = 0, droppable, smallest
    while high - low > 1:
        middle = (low + high) // 2
        tokens = count_tokens(messages_for_model(drop(middle)))
        if tokens <= target:
            high, high_tokens = middle, tokens
        else:
            low = middle
    return FitResult(drop(high), high, high_tokens)


def _exchange_starts(messages: tuple[Message, ...]) -> list[int]:
    """Indices where exchanges begin: each user message, and a leading reply on its own."""
    starts = [index for index, message in enumerate(messages) if message.role == "user"]
    if messages and (not starts or starts[0] != 0):
        starts.insert(0, 0)
    return starts


def slash_settings() -> list[str]:
    """What `/set` changes, in the settings table's order (which /help and Tab show)."""
    return [setting.name for setting in settings.SETTINGS if setting.slash]


def parse_setting(name: str, raw: str) -> tuple[str, SettingValue]:
    """Check a `/set NAME VALUE` pair: the canonical name and the typed value, or a UsageError."""
    key = name.strip().lower().replace("-", "_")
    setting = settings.find(settings.SLASH_ALIASES.get(key, key))
    if setting is None or not setting.slash:
        raise UsageError(f"unknown setting {name!r}", f"settings: {', '.join(slash_settings())}")
    try:
        return setting.name, settings.parse(setting, raw)
    except settings.Invalid as problem:
        raise UsageError(f"/set {setting.name} {problem}",
                         f"e.g. /set {setting.name} {_example(setting)}") from None


_EXAMPLES = {"seed": "42", "max_tokens": "512", "stop": "\\n\\n", "system": "You are terse."}


def _example(setting: settings.Setting) -> str:
    return _EXAMPLES.get(setting.name) or settings.format_value(setting, setting.default)
