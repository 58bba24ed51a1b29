"""Tokenize a chat prompt so that only the template's own text can make control tokens.

llama.cpp's tokenizer first cuts the text at every special token's text (longest first), then
runs the model's tokenizer (BPE, SentencePiece...) on each stretch of plain text in between,
on its own. Given the prompt as (text, is_content) pieces (`templates.render_pieces`), we make
the same cuts, but only in the template's pieces: a content is never cut, so a user's
`<|im_end|>` is plain text. Each stretch between two cuts, template text and contents together,
goes to llama.cpp in one call with special tokens off. For text that holds no special token's
text this gives exactly the tokens of tokenizing the whole prompt with special tokens on
(BPE merges and SentencePiece's leading space see the same stretches), so KV-cache reuse and
saved snapshots stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

# llama.cpp's llama_token_attr bits
ATTR_UNKNOWN = 1 << 0
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_RSTRIP = 1 << 6
ATTR_LSTRIP = 1 << 7
_SPECIAL = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
_C_SPACE = b" \t\n\v\f\r"  # C's isspace, which llama.cpp's strip attributes use
_CACHE_LIMIT = 1024  # template pieces remembered with the special tokens they hold

Chunk = tuple[bytes, bool]  # text, and whether it is a message content (never cut)


@dataclass(frozen=True)
class Special:
    """A special token as llama.cpp's partition sees it."""

    token: int
    text: bytes
    attr: int


class PromptTokenizer:
    """Tokens for a prompt given as pieces, through the model's own llama.cpp tokenizer."""

    def __init__(self, llama_cpp: ModuleType, vocab: int) -> None:  # vocab: a C pointer
        self._llama_cpp = llama_cpp
        self._vocab = vocab
        self._specials_in: dict[bytes, tuple[Special, ...]] = {}
        self._special_of: dict[int, Special | None] = {}
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))

    def tokenize(self, text: bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's tokenizer on `text`, with a buffer sized to the text (not to n_ctx)."""
        size = len(text) + 8  # a token covers at least one byte; room for BOS, EOS, a space
        buffer = (self._llama_cpp.llama_token * size)()
        count = self._llama_cpp.llama_tokenize(self._vocab, text, len(text), buffer, size,
                                               add_special, parse_special)
        if count < 0:
            size = -count
            buffer = (self._llama_cpp.llama_token * size)()
            count = self._llama_cpp.llama_tokenize(self._vocab, text, len(text), buffer, size,
                                                   add_special, parse_special)
        return list(buffer[:count])

    def tokenize_pieces(self, pieces: Sequence[tuple[str, bool]], add_special: bool) -> list[int]:
        """Tokens of the joined pieces: special tokens read in template pieces only."""
        chunks = [(text.encode("utf-8"), is_content) for text, is_content in pieces if text]
        specials = {special for text, is_content in chunks if not is_content
                    for special in self._specials(text)}
        tokens: list[int] = []
        if add_special and self.add_bos:
            tokens.append(self._llama_cpp.llama_vocab_bos(self._vocab))
        for fragment in partition(chunks, specials):
            if isinstance(fragment, int):
                tokens.append(fragment)
            else:
                tokens += self.tokenize(fragment, add_special=False, parse_special=False)
        if add_special and self.add_eos:
            tokens.append(self._llama_cpp.llama_vocab_eos(self._vocab))
        return tokens

    def _specials(self, text: bytes) -> tuple[Special, ...]:
        """The special tokens llama.cpp finds in a template piece (asked once per piece)."""
        found = self._specials_in.get(text)
        if found is None:
            tokens = self.tokenize(text, add_special=False, parse_special=True)
            found = tuple({special for token in tokens
                           if (special := self._special(token)) is not None})
            if len(self._specials_in) >= _CACHE_LIMIT:
                self._specials_in.clear()
            self._specials_in[text] = found
        return found

    def _special(self, token: int) -> Special | None:
        if token not in self._special_of:
            attr = int(self._llama_cpp.llama_vocab_get_attr(self._vocab, token))
            text = self._llama_cpp.llama_vocab_get_text(self._vocab, token) or b""
            self._special_of[token] = Special(token, text, attr) if attr & _SPECIAL and text \
                else None
        return self._special_of[token]


def partition(chunks: Sequence[Chunk], specials: set[Special] | Sequence[Special]
              ) -> list[int | bytes]:
    """Cut the text at the special tokens' texts as llama.cpp does, but never inside a content.

    The result alternates stretches of text (bytes) and special tokens (ids); longer texts are
    cut first, and a token marked to strip spaces on its left or right takes them off its
    neighbours, as in llama.cpp's `tokenizer_st_partition`.
    """
    fragments: list[int | list[Chunk]] = [list(chunks)]
    for special in sorted(specials, key=lambda s: (-len(s.text), s.token)):
        cut: list[int | list[Chunk]] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                cut.append(fragment)
            else:
                cut += _cut(fragment, special)
        fragments = cut
    return [fragment if isinstance(fragment, int) else b"".join(text for text, _ in fragment)
            for fragment in fragments]


def _cut(fragment: list[Chunk], special: Special) -> list[int | list[Chunk]]:
    out: list[int | list[Chunk]] = []
    rest = fragment
    while True:
        hit = next(((index, text.find(special.text)) for index, (text, is_content)
                    in enumerate(rest) if not is_content and special.text in text), None)
        if hit is None:
            if _length(rest):
                out.append(rest)
            return out
        index, at = hit
        text = rest[index][0]
        left = [*rest[:index], (text[:at], False)]
        right = [(text[at + len(special.text):], False), *rest[index + 1:]]
        if special.attr & ATTR_LSTRIP:
            left = _strip(left, from_end=True)
        if special.attr & ATTR_RSTRIP:
            right = _strip(right, from_end=False)
        if _length(left):
            out.append(left)
        out.append(special.token)
        rest = right


def _strip(chunks: list[Chunk], from_end: bool) -> list[Chunk]:
    """Whitespace off one end of a stretch, across chunk borders."""
    chunks = [chunk for chunk in chunks if chunk[0]]
    order = range(len(chunks) - 1, -1, -1) if from_end else range(len(chunks))
    for index in order:
        text, is_content = chunks[index]
        kept = text.rstrip(_C_SPACE) if from_end else text.lstrip(_C_SPACE)
        chunks[index] = (kept, is_content)
        if kept:
            break
    return [chunk for chunk in chunks if chunk[0]]


def _length(chunks: list[Chunk]) -> int:
    return sum(len(text) for text, _ in chunks)
