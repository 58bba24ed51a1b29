"""The text side of one reply in the decode loop: thinking split from the answer, and stop
strings looked for in the answer only (a stop string inside the thinking must not end the reply).

Pure: the engine feeds the text of each token as it is decoded and yields the parts that come
back; the remote engine does the same with the text a server streams.
"""

from __future__ import annotations

from collections.abc import Sequence

from localchat.engine.reasoning import ANSWER, REASONING, Family, Part, Splitter


class ReplyText:
    """One reply's text, piece by piece: `feed` returns the parts ready to show."""

    def __init__(self, stops: Sequence[str] = (), family: Family | None = None,
                 inside: bool = False, strip_leading: bool = False) -> None:
        self.splitter = Splitter(family, inside)
        self.stops = tuple(stop for stop in stops if stop)
        self.stopped = False  # a stop string was found: the reply ends here
        self._held = ""  # answer text that might be the start of a stop string
        self._leading = strip_leading  # a chat reply starts at its first visible character

    @property
    def thinking(self) -> bool:
        """True while the reply is inside its thinking block."""
        return self.splitter.thinking

    def feed(self, text: str) -> list[Part]:
        """The parts `text` completes, cut at a stop string (then `stopped` is True)."""
        if self.stopped:
            return []
        if self._leading:
            text = text.lstrip(" ")
            self._leading = not text
        return self._stop_filter(self.splitter.feed(text))

    def finish(self) -> list[Part]:
        """What is still held, once the reply has ended by other means than a stop string."""
        if self.stopped:
            return []
        parts = self._stop_filter(self.splitter.finish())
        if self._held and not self.stopped:
            parts.append(Part(ANSWER, self._held))
        self._held = ""
        return parts

    def _stop_filter(self, parts: list[Part]) -> list[Part]:
        out: list[Part] = []
        for part in parts:
            if part.kind == REASONING or not self.stops:
                out.append(part)
                continue
            text = self._held + part.text
            cut = find_stop(text, self.stops)
            if cut is not None:
                if text[:cut]:
                    out.append(Part(ANSWER, text[:cut]))
                self._held, self.stopped = "", True
                break
            keep = stop_prefix_length(text, self.stops)
            self._held = text[len(text) - keep:] if keep else ""
            if text[: len(text) - keep]:
                out.append(Part(ANSWER, text[: len(text) - keep]))
        return out


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest
