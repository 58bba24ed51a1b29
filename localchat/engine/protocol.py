"""The engine seam: what the one-shot run, the chat, the server and bench ask of a model.

Two implementations: `local.LocalEngine` (llama.cpp in this process) and `remote.RemoteEngine`
(any OpenAI-compatible server). The request side (`Sampling`) and the accounting side
(`GenerationStats`) are shared by both. A reply streams as `Part`s, thinking apart from the
answer (`stream_parts`); `stream` gives the answer alone.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from localchat import settings
from localchat.engine.reasoning import ANSWER, Part, Thinking
from localchat.errors import UsageError

if TYPE_CHECKING:
    from localchat.engine.grammar import OutputGrammar


@dataclass(frozen=True)
class Sampling:
    """Sampling settings, the "sampling" rows of the settings table; temperature 0 is greedy."""

    temperature: float = settings.get("temperature").default
    top_p: float = settings.get("top_p").default
    top_k: int = settings.get("top_k").default
    min_p: float = settings.get("min_p").default
    repeat_penalty: float = settings.get("repeat_penalty").default
    presence_penalty: float = settings.get("presence_penalty").default
    frequency_penalty: float = settings.get("frequency_penalty").default
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    think: bool | None = None  # None: the template's default (thinking models think)
    think_budget: int | None = None  # tokens of thinking before the closing marker is inserted
    grammar: OutputGrammar | None = None  # --schema, --format json, --grammar: not a setting row
    draft: str = settings.get("draft").default

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> Sampling:
        """The sampling rows of merged settings (`settings.merge`): the fields are those rows."""
        return cls(**settings.values_of("sampling", values))

    def record(self) -> dict[str, Any]:
        """The settings as the history keeps them: the grammar by what the user gave."""
        values = {key: value for key, value in asdict(self).items() if key != "grammar"}
        if self.grammar is not None:
            values["output"] = {"kind": self.grammar.kind, "label": self.grammar.label}
        return values

    def validate(self) -> None:
        """The last check before llama.cpp: a value outside the settings table is a usage error
        naming the setting (the front ends check first, naming their flag, key or field)."""
        for setting in settings.in_scope("sampling"):
            problem = settings.check(setting, getattr(self, setting.name))
            if problem:
                raise UsageError(f"{setting.name} {problem}")


@dataclass(frozen=True)
class ReplyOptions:
    """What an API request may add that is no row of the settings table: tool definitions for
    the chat template, OpenAI's `logit_bias` and `logprobs`. The default adds nothing and costs
    nothing."""

    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to logit
    logprobs: int | None = None  # None: off; N: the chosen token's and the N likeliest (0-20)
    tools: tuple[Mapping[str, Any], ...] = ()  # OpenAI tool definitions, for the chat template


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before sampling changes it)."""

    token: bytes  # the token's text as the vocabulary spells it (may be part of a character)
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()  # the likeliest tokens, most likely first


@dataclass(frozen=True)
class GenerationStats:
    """What one reply cost, counted by the engine (tokens) and the wall clock (seconds)."""

    prompt_tokens: int  # all tokens of the formatted prompt
    cached_tokens: int  # reused from the KV cache of the previous turn
    completion_tokens: int
    ttft_s: float  # from the call to the first generated token
    prefill_s: float  # evaluating the new prompt tokens
    decode_s: float  # from the first generated token to the last
    # stop | length (max_tokens) | context (the window is full) | interrupted | thinking (a
    # token limit ended the reply inside its thinking block: no answer)
    finish_reason: str
    tokens_estimated: bool = False  # a remote server sent no usage: the counts are our estimate
    reasoning_tokens: int = 0  # of completion_tokens, those inside the thinking block
    # Prompt-lookup drafting (engine/speculative.py); all 0 when it is off or never paid.
    draft_tokens: int = 0  # drafted tokens sent to be verified
    draft_accepted: int = 0  # of them, taken into the reply
    draft_steps: int = 0  # verify steps: evaluations that carried a draft

    @property
    def draft_acceptance(self) -> float | None:
        """The fraction of drafted tokens that were accepted, or None when nothing was drafted."""
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_verify_step(self) -> float | None:
        """Reply tokens each verify step gave (its accepted drafts and the model's own next
        token), or None when nothing was drafted."""
        return (self.draft_accepted + self.draft_steps) / self.draft_steps \
            if self.draft_steps else None

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens actually processed this turn."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt processing speed, or None when too little was processed to time."""
        if self.prefill_tokens <= 0 or self.prefill_s <= 0:
            return None
        return self.prefill_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generation speed over the tokens after the first, as llama.cpp reports it."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.completion_tokens - 1) / self.decode_s


class EngineInfo(Protocol):
    """What callers read about a ready engine: `LoadInfo` locally, `RemoteInfo` remotely."""

    @property
    def model_path(self) -> object: ...
    @property
    def load_s(self) -> float: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def threads(self) -> int | None: ...
    @property
    def backend(self) -> str: ...
    @property
    def chat_format(self) -> str: ...
    @property
    def chat_format_source(self) -> str: ...


class Engine(Protocol):
    """The interface one-shot runs, the REPL and benchmarks use: LocalEngine and RemoteEngine."""

    last_stats: GenerationStats | None

    @property
    def info(self) -> EngineInfo: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def thinking(self) -> Thinking | None: ...
    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int: ...
    def stream(self, messages: Sequence[dict[str, str]], sampling: Sampling
               ) -> Generator[str, None, None]: ...
    def stream_parts(self, messages: Sequence[dict[str, str]], sampling: Sampling
                     ) -> Generator[Part, None, None]: ...
    def close(self) -> None: ...


def answer_only(parts: Generator[Part, None, None]) -> Generator[str, None, None]:
    """The answer's text of a reply's parts: `Engine.stream` for callers that show no thinking.
    Closing this generator closes `parts` (which stops the decode loop at once)."""
    try:
        for part in parts:
            if part.kind == ANSWER:
                yield part.text
    finally:
        parts.close()
