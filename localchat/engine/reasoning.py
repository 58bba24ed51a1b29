"""Thinking models: which markers open and close their thinking, and a reply split in two.

Reasoning models (Qwen3, QwQ, the DeepSeek-R1 distills, SmolLM3, Seed-OSS...) write their
thinking between two markers before they answer. Which markers, and how a chat template switches
thinking off, is data per family (`FAMILIES`, `SWITCHES`), never code per model. `Splitter` turns
the reply's text, piece by piece as it is generated, into reasoning and answer parts: a marker
may arrive cut across tokens, the block may have been opened by the prompt already (newer R1
templates end their generation prompt with `<think>`), and a reply may end with its block
still open (all reasoning, no answer). Pure: no I/O, no llama.cpp; the engine's decode loop and
the remote engine use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

REASONING, ANSWER = "reasoning", "answer"


@dataclass(frozen=True)
class Part:
    """A piece of a reply: thinking (`REASONING`) or the answer (`ANSWER`)."""

    kind: str
    text: str
    tokens: int = 0  # reasoning parts from the local engine: the thinking's tokens so far


@dataclass(frozen=True)
class Family:
    """A family of thinking models: the markers around their thinking."""

    name: str
    open: str
    close: str

    @property
    def close_text(self) -> str:
        """What a thinking budget inserts to end the thinking: the closing marker on its own
        line, then the blank line these models put before their answer."""
        return f"\n{self.close}\n\n"


# Most reasoning models use <think>...</think>: Qwen3, QwQ, DeepSeek-R1 and its distills,
# SmolLM3, GLM-4.5+, MiniMax-M2, Kimi-K2-Thinking. ByteDance's Seed-OSS namespaces its markers.
FAMILIES: tuple[Family, ...] = (
    Family("seed", "<seed:think>", "</seed:think>"),
    Family("think", "<think>", "</think>"),
)
# Template variables that switch thinking on and off (Qwen3, SmolLM3, the newer R1 templates).
SWITCHES: tuple[str, ...] = ("enable_thinking",)


@dataclass(frozen=True)
class Thinking:
    """How a loaded model thinks, as far as its file tells."""

    family: Family
    source: str  # "chat template", "vocabulary" or "catalog"
    switch: str | None = None  # the template variable that turns thinking off, if any
    opened_by_prompt: bool = False  # the template's generation prompt opens the block

    def describe(self) -> str:
        """One line for `localchat show` and `/show`."""
        how = (f"it can be switched off (--no-think sets the template's {self.switch})"
               if self.switch else "always (no switch in its template; --think-budget 0 skips it)")
        return f"yes, {self.family.open}...{self.family.close} ({self.source}); {how}"


def family_named(name: str) -> Family | None:
    """The family called `name` (a catalog entry's `thinking = "think"`), or None."""
    return next((family for family in FAMILIES if family.name == name), None)


def family_in_template(template: str) -> Family | None:
    """The family whose markers a chat template mentions, or None."""
    return next((family for family in FAMILIES
                 if family.close in template or family.open in template), None)


def family_in_vocabulary(special_tokens: Iterable[str]) -> Family | None:
    """The family both of whose markers are special tokens of the vocabulary, or None."""
    tokens = frozenset(special_tokens)
    return next((family for family in FAMILIES
                 if family.open in tokens and family.close in tokens), None)


def switch_in_template(template: str) -> str | None:
    """The variable a template reads to switch thinking off, or None."""
    return next((name for name in SWITCHES if name in template), None)


def opens_block(prompt: str, family: Family) -> bool:
    """True when a rendered prompt leaves a thinking block open for the reply."""
    end = prompt.rstrip()
    return end.endswith(family.open)


def split_text(text: str, family: Family | None, inside: bool = False) -> tuple[str, str]:
    """A whole reply as (reasoning, answer): `Splitter` fed everything at once."""
    splitter = Splitter(family, inside)
    parts = splitter.feed(text) + splitter.finish()
    return ("".join(p.text for p in parts if p.kind == REASONING),
            "".join(p.text for p in parts if p.kind == ANSWER))


_START, _THINKING, _ANSWER = "start", "thinking", "answer"


class Splitter:
    """Reasoning and answer, from a reply's text as it arrives.

    The block is recognised only at the start of the reply (after leading whitespace), as
    llama-server does: a marker inside the answer is just text, and a reply has one block at
    most. Whitespace right after the opening marker, before the closing one and before the
    answer is dropped. Text that may be the start of a marker is held until the next piece
    tells; `finish` releases what is still held. With no family everything is answer.
    """

    def __init__(self, family: Family | None, inside: bool = False) -> None:
        self.family = family
        self._state = _ANSWER if family is None else (_THINKING if inside else _START)
        self._held = ""
        self._strip = inside  # drop whitespace before the first visible character
        self.closed = False  # a block was opened and closed

    @property
    def thinking(self) -> bool:
        """True while the reply is inside its thinking block."""
        return self._state == _THINKING

    @property
    def undecided(self) -> bool:
        """True while the reply might still open a block (nothing visible yet)."""
        return self._state == _START

    def feed(self, text: str) -> list[Part]:
        """The parts `text` completes; some of it may be held until the next piece."""
        parts: list[Part] = []
        self._held += text
        while self._held:
            before = (self._state, len(self._held))
            if self._state == _START:
                self._from_start(parts)
            elif self._state == _THINKING:
                self._from_thinking(parts)
            else:
                self._emit(parts, ANSWER, self._held)
                self._held = ""
            if (self._state, len(self._held)) == before:
                break  # waiting for more text
        return parts

    def finish(self) -> list[Part]:
        """The end of the reply: what was held is what it looked like."""
        held, self._held = self._held, ""
        if self._state == _THINKING:
            return [Part(REASONING, held.rstrip())] if held.strip() else []
        return [Part(ANSWER, held)] if held.strip() else []

    def _from_start(self, parts: list[Part]) -> None:
        assert self.family is not None
        opener = self.family.open
        visible = self._held.lstrip()
        if visible.startswith(opener):
            self._held = visible[len(opener):]
            self._state, self._strip = _THINKING, True
        elif not visible or opener.startswith(visible):
            return  # whitespace, or maybe the opening marker: wait
        else:
            self._state = _ANSWER

    def _from_thinking(self, parts: list[Part]) -> None:
        assert self.family is not None
        closer, held = self.family.close, self._held
        if self._strip:
            held = held.lstrip()
            self._strip = not held
        at = held.find(closer)
        if at >= 0:
            self._emit(parts, REASONING, held[:at].rstrip())
            self._held = held[at + len(closer):]
            self._state, self._strip, self.closed = _ANSWER, True, True
            return
        overlap = _prefix_overlap(held, closer)
        rest = held[:len(held) - overlap]
        keep = overlap + len(rest) - len(rest.rstrip())  # a marker's start and the blank before
        self._emit(parts, REASONING, held[:len(held) - keep])
        self._held = held[len(held) - keep:]

    def _emit(self, parts: list[Part], kind: str, text: str) -> None:
        if kind == ANSWER and self._strip:
            text = text.lstrip()
            self._strip = not text
        if text:
            if parts and parts[-1].kind == kind:
                parts[-1] = Part(kind, parts[-1].text + text)
            else:
                parts.append(Part(kind, text))


def _prefix_overlap(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
