"""Conversation values, the context-window policy and /set parsing.

The policy is tested here with a word counter that imitates a chat template (a BOS token, a
header per message, the generation prompt): it is deterministic and makes the numbers easy to
follow. Tests with the real SmolLM2 tokenizer (through `LocalEngine.count_tokens`) belong with
the REPL and engine tests.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from localchat.chat.conversation import (
    Conversation,
    Message,
    fit_to_window,
    messages_for_model,
    parse_setting,
    slash_settings,
)
from localchat.errors import ContextOverflowError, UsageError


class WordCounter:
    """Tokens = 1 BOS + per message (4 header tokens + its words) + 3 for the reply's header."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages: list[dict[str, str]]) -> int:
        self.calls += 1
        return 1 + sum(4 + len(m["content"].split()) for m in messages) + 3


def words(count: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


def chat_of(exchanges: int, size: int = 10, system: str | None = "Be brief.") -> Conversation:
    conversation = Conversation(system=system)
    for turn in range(exchanges):
        conversation = conversation.add_user(words(size, f"q{turn}-"))
        conversation = conversation.add_assistant(words(size, f"a{turn}-"))
    return conversation


# --- values ---------------------------------------------------------------------------------


def test_messages_for_model_puts_the_system_prompt_first() -> None:
    conversation = Conversation(system="Be brief.").add_user("hi").add_assistant("hello")
    assert messages_for_model(conversation) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert messages_for_model(Conversation().add_user("hi")) == [{"role": "user", "content": "hi"}]


def test_changes_return_new_values_and_leave_the_old_one_alone() -> None:
    empty = Conversation()
    one = empty.add_user("hi")
    assert empty.messages == () and one.messages == (Message("user", "hi"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.system = "x"  # type: ignore[misc]


def test_interrupted_reply_is_kept_marked_and_sent_as_plain_text() -> None:
    conversation = Conversation().add_user("hi").add_assistant("Hel", interrupted=True)
    assert conversation.messages[-1] == Message("assistant", "Hel", interrupted=True)
    assert messages_for_model(conversation)[-1] == {"role": "assistant", "content": "Hel"}


def test_undo_drops_the_last_exchange() -> None:
    two = chat_of(2)
    one = two.undo()
    assert one.messages == two.messages[:2]
    assert one.system == "Be brief."
    # A user message that never got a reply (an error, or Ctrl-C before the first token).
    pending = one.add_user("and then?")
    assert pending.undo() == one
    assert one.undo() == Conversation(system="Be brief.")


def test_undo_of_an_empty_conversation_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="nothing to undo"):
        Conversation(system="s").undo()


def test_without_last_reply_keeps_the_question_for_retry() -> None:
    conversation = chat_of(2)
    retry = conversation.without_last_reply()
    assert retry.messages == conversation.messages[:-1]
    assert retry.messages[-1].role == "user"
    # The formatted history stays a prefix of the old one, so the KV cache is reused.
    assert messages_for_model(conversation)[:-1] == messages_for_model(retry)
    # Retrying again before a new reply arrives changes nothing.
    assert retry.without_last_reply() == retry


def test_without_last_reply_needs_a_question() -> None:
    with pytest.raises(UsageError, match="nothing to retry"):
        Conversation().without_last_reply()
    with pytest.raises(UsageError, match="nothing to retry"):
        greeting = Conversation(messages=(Message("assistant", "Hello! Ask me anything."),))
        greeting.without_last_reply()


def test_with_system_and_cleared() -> None:
    conversation = chat_of(1).with_system("You are terse.")
    assert conversation.system == "You are terse."
    assert conversation.with_system("  ").system is None
    cleared = conversation.cleared()
    assert cleared == Conversation(system="You are terse.")


def test_unknown_role_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="role"):
        Message("tool", "x")


# --- the context window ---------------------------------------------------------------------


def test_a_conversation_that_fits_is_untouched_with_one_count() -> None:
    counter = WordCounter()
    conversation = chat_of(3).add_user("why?")
    result = fit_to_window(conversation, counter, n_ctx=4096, reserve=512)
    assert result.conversation == conversation
    assert result.dropped_exchanges == 0
    assert counter.calls == 1
    assert result.prompt_tokens == WordCounter()(messages_for_model(conversation))


def test_exactly_full_still_fits() -> None:
    conversation = chat_of(2).add_user("why?")
    needed = WordCounter()(messages_for_model(conversation))
    result = fit_to_window(conversation, WordCounter(), n_ctx=needed + 100, reserve=100)
    assert result.dropped_exchanges == 0
    with pytest.raises(ContextOverflowError):
        fit_to_window(Conversation().add_user(words(50)), WordCounter(), n_ctx=100, reserve=100)


@pytest.mark.parametrize(("n_ctx", "n_ctx_train", "hint"), [
    (100, None, "use --ctx 1024 or more if the model allows it"),
    (100, 8192, "use --ctx 1024 or more (this model was trained on 8192)"),
    (100, 512, "raise --ctx up to 512, this model's trained length"),
    (100, 100, "--ctx 100 is already at this model's trained length (100)"),
    (100, 64, "--ctx 100 is already past this model's trained length (64)"),
])
def test_a_message_that_cannot_fit_asks_for_more_context_only_while_the_model_allows(
        n_ctx, n_ctx_train, hint):
    with pytest.raises(ContextOverflowError) as caught:
        fit_to_window(Conversation().add_user(words(150)), WordCounter(), n_ctx=n_ctx,
                      reserve=10, n_ctx_train=n_ctx_train)
    assert hint in caught.value.hint
    assert ("raise --ctx" in caught.value.hint or "use --ctx" in caught.value.hint) == (
        n_ctx_train is None or n_ctx < n_ctx_train)


def test_overflow_drops_oldest_whole_exchanges_down_to_half_the_window() -> None:
    counter = WordCounter()
    conversation = chat_of(40).add_user(words(10, "newest"))  # 40 exchanges of 28 tokens
    n_ctx, reserve = 1024, 128
    result = fit_to_window(conversation, counter, n_ctx=n_ctx, reserve=reserve)

    kept = result.conversation
    assert kept.system == "Be brief."
    assert kept.messages[-1] == conversation.messages[-1]
    # Whole exchanges, oldest first: what is kept is a suffix starting at a user message.
    assert kept.messages == conversation.messages[2 * result.dropped_exchanges :]
    assert kept.messages[0].role == "user"
    assert result.prompt_tokens == WordCounter()(messages_for_model(kept))
    # A big step: at most half the window, and not one exchange more than needed for that.
    assert result.prompt_tokens <= n_ctx // 2
    one_fewer = dataclasses.replace(
        conversation, messages=conversation.messages[2 * (result.dropped_exchanges - 1) :]
    )
    assert WordCounter()(messages_for_model(one_fewer)) > n_ctx // 2
    # Few counts: 1 (everything) + 1 (the smallest prompt) + a binary search over 40.
    assert counter.calls <= 2 + math.ceil(math.log2(40))


def test_after_a_trim_the_next_turns_only_append() -> None:
    """The KV cache of the kept prefix is reused: no turn re-trims until the window is full."""
    counter = WordCounter()
    n_ctx, reserve = 2048, 256
    conversation = chat_of(70).add_user("next")
    result = fit_to_window(conversation, counter, n_ctx, reserve)
    assert result.dropped_exchanges > 0
    live = result.conversation.add_assistant(words(10))
    turns_without_trim = 0
    while True:
        before = messages_for_model(live)
        candidate = live.add_user(words(10, "more"))
        result = fit_to_window(candidate, counter, n_ctx, reserve)
        if result.dropped_exchanges:
            break
        assert messages_for_model(result.conversation)[: len(before)] == before
        live = result.conversation.add_assistant(words(10))
        turns_without_trim += 1
    # From at most half the window up to the limit, in 28-token exchanges.
    assert turns_without_trim >= (n_ctx - reserve - n_ctx // 2) // 28 - 1


def test_a_long_newest_exchange_drops_everything_older() -> None:
    conversation = chat_of(5).add_user(words(800))
    result = fit_to_window(conversation, WordCounter(), n_ctx=1024, reserve=128)
    assert result.dropped_exchanges == 5
    assert result.conversation.messages == (conversation.messages[-1],)
    # Over half the window but within the limit: kept, with nothing older.
    assert 512 < result.prompt_tokens <= 1024 - 128


def test_a_prompt_that_cannot_fit_is_refused_with_the_numbers() -> None:
    conversation = chat_of(3).add_user(words(1000))
    with pytest.raises(ContextOverflowError) as caught:
        fit_to_window(conversation, WordCounter(), n_ctx=1024, reserve=256)
    error = caught.value
    needed = WordCounter()(messages_for_model(Conversation("Be brief.").add_user(words(1000))))
    assert error.message == (
        f"prompt is {needed} tokens; the context window is 1024 with 256 reserved for the reply"
    )
    assert "--ctx 2048" in (error.hint or "")


def test_system_prompt_alone_too_big_is_refused() -> None:
    conversation = Conversation(system=words(300))
    with pytest.raises(ContextOverflowError, match="prompt is 308 tokens"):
        fit_to_window(conversation, WordCounter(), n_ctx=256, reserve=0)


def test_reserve_as_big_as_the_window_is_refused() -> None:
    with pytest.raises(ContextOverflowError, match="with 512 reserved"):
        fit_to_window(Conversation().add_user("hi"), WordCounter(), n_ctx=512, reserve=512)


def test_a_reply_first_conversation_counts_the_greeting_as_an_exchange() -> None:
    greeting = Conversation(messages=(Message("assistant", words(300)),))
    conversation = greeting.add_user("hi").add_assistant("hello").add_user(words(10))
    result = fit_to_window(conversation, WordCounter(), n_ctx=256, reserve=32)
    assert result.conversation.messages[0].role == "user"
    assert result.conversation.messages[-1] == conversation.messages[-1]


def test_non_additive_counts_are_handled_because_counts_are_real() -> None:
    """A template that adds a default system prompt only when there is none (as SmolLM2's does)."""

    def count(messages: list[dict[str, str]]) -> int:
        default = 0 if messages and messages[0]["role"] == "system" else 20
        return default + sum(2 + len(m["content"].split()) for m in messages)

    conversation = Conversation()
    for turn in range(30):
        conversation = conversation.add_user(words(8, f"q{turn}")).add_assistant(words(8))
    conversation = conversation.add_user("last")
    result = fit_to_window(conversation, count, n_ctx=400, reserve=40)
    assert result.prompt_tokens == count(messages_for_model(result.conversation)) <= 200


# --- /set -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("temperature", "0.2", ("temperature", 0.2)),
        ("temp", "0", ("temperature", 0.0)),
        ("top-p", "1", ("top_p", 1.0)),
        ("top_k", "0", ("top_k", 0)),
        ("min_p", " 0.05 ", ("min_p", 0.05)),
        ("repeat_penalty", "1.1", ("repeat_penalty", 1.1)),
        ("seed", "42", ("seed", 42)),
        ("seed", "none", ("seed", None)),
        ("max_tokens", "256", ("max_tokens", 256)),
        ("max-tokens", "None", ("max_tokens", None)),
        ("markdown", "off", ("markdown", False)),
        ("markdown", "ON", ("markdown", True)),
        ("markdown", "true", ("markdown", True)),
        ("system", "  You are terse.  ", ("system", "You are terse.")),
        ("system", "", ("system", "")),
        ("Temperature", "1e-1", ("temperature", 0.1)),
    ],
)
def test_parse_setting_accepts(name: str, raw: str, expected: tuple[str, object]) -> None:
    assert parse_setting(name, raw) == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("temperature", "abc"),
        ("temperature", "-0.1"),
        ("temperature", "nan"),
        ("temperature", "inf"),
        ("temperature", ""),
        ("top_p", "0"),
        ("top_p", "1.5"),
        ("top_k", "-1"),
        ("top_k", "2.5"),
        ("min_p", "1.01"),
        ("repeat_penalty", "0"),
        ("seed", "abc"),
        ("seed", "-1"),
        ("seed", str(2**32 - 1)),
        ("max_tokens", "0"),
        ("max_tokens", "lots"),
        ("markdown", "maybe"),
    ],
)
def test_parse_setting_refuses_bad_values_in_one_line(name: str, raw: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_setting(name, raw)
    error = caught.value
    assert error.message.startswith(f"/set {name} must be ")
    assert "\n" not in str(error)
    assert error.hint and error.hint.startswith("e.g. /set ")


def test_parse_setting_message_names_the_value_and_what_is_expected() -> None:
    with pytest.raises(UsageError) as caught:
        parse_setting("temperature", "abc")
    assert caught.value.message == "/set temperature must be a number, 0 or more (got 'abc')"
    assert caught.value.hint == "e.g. /set temperature 0.8"
    with pytest.raises(UsageError, match=r"^/set top_k must be an integer, 0 or more \(got ''\)"):
        parse_setting("top_k", "  ")
    with pytest.raises(UsageError, match=r"^/set top_p must be in \(0, 1\] \(got 0.0\)"):
        parse_setting("top_p", "0")


def test_parse_setting_keeps_a_multiline_value_on_one_line() -> None:
    with pytest.raises(UsageError) as caught:
        parse_setting("temperature", "1\n2")
    assert "\n" not in str(caught.value)


def test_unknown_setting_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as caught:
        parse_setting("verbosity", "3")
    assert caught.value.message == "unknown setting 'verbosity'"
    assert all(name in (caught.value.hint or "") for name in slash_settings())
