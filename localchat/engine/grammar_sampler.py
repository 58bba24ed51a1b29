"""A grammar in llama.cpp's sampling, run the way llama.cpp's own `common_sampler` runs it.

Put in the sampler chain, llama.cpp's grammar sampler checks every one of the vocabulary's tokens
against the grammar at every step (tens of thousands of partial matches), which more than halves
the decode speed of a small model. `common_sampler_sample` (llama.cpp's common/sampling.cpp)
instead lets the chain pick from all tokens first, checks only that pick against the grammar,
and applies the grammar to every candidate only when the pick is refused, then picks again. The
result is the same for greedy decoding (the best allowed token either way); with sampling it
is llama.cpp's own behaviour. Both the chain and the grammar accept each chosen token.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from localchat.engine.runtime import captured_llama_output
from localchat.errors import UsageError

if TYPE_CHECKING:
    from types import ModuleType

    import numpy as np
    import numpy.typing as npt
    from llama_cpp._internals import LlamaContext, LlamaSampler

    from localchat.engine.grammar import OutputGrammar
    from localchat.engine.protocol import Sampling
    from localchat.engine.reasoning import Thinking


def init_grammar(llama_cpp: ModuleType, vocab: object, grammar: OutputGrammar) -> object:
    """llama.cpp's grammar sampler for `grammar` (the caller frees it), or UsageError with the
    parser's reason on one line."""
    with captured_llama_output() as said:
        if grammar.triggers:  # lazy: free text until a trigger matches (a tool call's opening)
            patterns = (ctypes.c_char_p * len(grammar.triggers))(
                *(pattern.encode("utf-8") for pattern in grammar.triggers))
            pointer = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, grammar.gbnf.encode("utf-8"), b"root", patterns, len(grammar.triggers),
                (llama_cpp.llama_token * 0)(), 0)
        else:
            pointer = llama_cpp.llama_sampler_init_grammar(vocab, grammar.gbnf.encode("utf-8"),
                                                           b"root")
    if not pointer:
        raise UsageError(f"the grammar {grammar.label} does not parse: {grammar_problem(said)}",
                         "see llama.cpp's grammars/README.md for the GBNF syntax")
    return pointer


def grammar_problem(said: Sequence[str]) -> str:
    """llama.cpp's reason a grammar failed, from what it printed, on one line."""
    marker = "error parsing grammar: "
    for line in said:
        if marker in line:
            return line.split(marker, 1)[1].strip()[:200]
    reasons = [line.strip() for line in said if line.strip()]
    return reasons[-1][:200] if reasons else "llama.cpp refused it"


class GrammarSampler:
    """The chain and a grammar; `sample` has LlamaSampler's signature, so the decode loop is the
    same with or without one. Owns the grammar sampler (freed on close)."""

    def __init__(self, llama_cpp: ModuleType, chain: LlamaSampler, grammar: object,
                 n_vocab: int) -> None:
        from llama_cpp._internals import LlamaTokenDataArray

        self._llama_cpp, self.chain, self._grammar, self._n_vocab = (
            llama_cpp, chain, grammar, n_vocab)
        self._all = LlamaTokenDataArray(n_vocab=n_vocab)  # reused: no allocation per token
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(
            data=self._one, size=1, selected=-1, sorted=False)
        self.rejections = 0  # picks the grammar refused (for tests and curiosity)

    def sample(self, ctx: LlamaContext, idx: int = -1) -> int:
        """Pick the next token the grammar allows, and let the chain and the grammar see it."""
        import numpy as np

        llama_cpp = self._llama_cpp
        pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        token = self._pick(logits, with_grammar=False)
        if not self._allowed(token):
            self.rejections += 1
            token = self._pick(logits, with_grammar=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self.chain.sampler, token)
        return token

    def _pick(self, logits: npt.NDArray[np.float32], *, with_grammar: bool) -> int:
        llama_cpp, candidates = self._llama_cpp, self._all
        candidates.copy_logits(logits)
        candidates.candidates.selected = -1
        array = ctypes.byref(candidates.candidates)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self._grammar, array)
        llama_cpp.llama_sampler_apply(self.chain.sampler, array)
        return int(candidates.candidates_data.id[candidates.candidates.selected])

    def _allowed(self, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        self._llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return math.isfinite(self._one[0].logit)

    def close(self) -> None:
        """Free the grammar sampler (the chain frees itself)."""
        if self._grammar is not None:
            self._llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None

    def __del__(self) -> None:
        self.close()


def without_thinking(thinking: Thinking | None, sampling: Sampling) -> Sampling:
    """The sampling for a grammar on this model: a grammar shapes every sampled token, so a model
    that thinks first must not (its template's switch turns it off); one that cannot switch it
    off is refused, since its thinking would be forced into the grammar's shape."""
    from dataclasses import replace

    if sampling.grammar is None or thinking is None or sampling.think is False:
        return sampling
    if thinking.switch is None:
        raise UsageError("this model thinks before it answers and its chat template cannot "
                         "switch that off, so a grammar would shape its thinking",
                         "use --schema, --format and --grammar with a model that does not think")
    return replace(sampling, think=False)
