"""The engine seam: what the one-shot run, the chat, the server and bench ask of a model.

Two implementations: `local.LocalEngine` (llama.cpp in this process) and `remote.RemoteEngine`
(any OpenAI-compatible server). The request side (`Sampling`) and the accounting side
(`GenerationStats`) are shared by both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from localchat.errors import UsageError


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; temperature 0 means greedy (deterministic)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Check ranges; a bad value is a usage error naming the flag."""
        checks = [
            (self.temperature >= 0, f"--temperature must be 0 or more (got {self.temperature})"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"--top-k must be 0 (off) or more (got {self.top_k})"),
            (0 <= self.min_p <= 1, f"--min-p must be in [0, 1] (got {self.min_p})"),
            (self.repeat_penalty > 0,
             f"--repeat-penalty must be above 0 (got {self.repeat_penalty})"),
            (self.max_tokens is None or self.max_tokens > 0,
             f"--max-tokens must be 1 or more (got {self.max_tokens})"),
            (self.seed is None or 0 <= self.seed < 2**32 - 1,
             f"--seed must be in [0, 4294967294] (got {self.seed})"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclass(frozen=True)
class GenerationStats:
    """What one reply cost, counted by the engine (tokens) and the wall clock (seconds)."""

    prompt_tokens: int  # all tokens of the formatted prompt
    cached_tokens: int  # reused from the KV cache of the previous turn
    completion_tokens: int
    ttft_s: float  # from the call to the first generated token
    prefill_s: float  # evaluating the new prompt tokens
    decode_s: float  # from the first generated token to the last
    finish_reason: str  # stop | length | interrupted

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
    def threads(self) -> int: ...
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
    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int: ...
    def stream(self, messages: Sequence[dict[str, str]], sampling: Sampling) -> Iterator[str]: ...
    def close(self) -> None: ...
