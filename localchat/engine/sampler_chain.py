"""One reply's sampler, built from its `Sampling`: llama.cpp's chain (logit bias, penalties, then
greedy or top-k, top-p, min-p, temperature and a seeded draw), wrapped with the grammar of
--schema, --format json or --grammar when there is one; and a token's log-probabilities."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from localchat.engine.protocol import Sampling, TokenLogprob

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaSampler

    from localchat.engine.grammar import OutputGrammar
    from localchat.engine.grammar_sampler import GrammarSampler

PENALTY_LAST_N = 64  # llama.cpp's default window for repeat penalties


def chain(n_vocab: int, sampling: Sampling, logit_bias: Mapping[int, float],
          banned: Collection[int] = ()) -> LlamaSampler:
    """llama.cpp's sampler chain; `banned` tokens (the end of turn, for --ignore-eos) never come."""
    from llama_cpp import _internals

    sampler = _internals.LlamaSampler()
    bias = {**logit_bias, **dict.fromkeys(banned, float("-inf"))}
    if bias:  # first: the penalties and every later step see the biased logits
        sampler.add_logit_bias(n_vocab, bias)
    if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) \
            != (1.0, 0.0, 0.0):
        sampler.add_penalties(n_vocab=n_vocab, penalty_last_n=PENALTY_LAST_N,
                              penalty_repeat=sampling.repeat_penalty,
                              penalty_freq=sampling.frequency_penalty,
                              penalty_present=sampling.presence_penalty)
    if sampling.temperature == 0:
        sampler.add_greedy()
        return sampler
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4)) >> 1
    if sampling.top_k > 0:
        sampler.add_top_k(sampling.top_k)
    sampler.add_top_p(sampling.top_p, 1)
    sampler.add_min_p(sampling.min_p, 1)
    sampler.add_temp(sampling.temperature)
    sampler.add_dist(seed)
    return sampler


def with_grammar(llama_cpp: Any, vocab: Any, sampler: LlamaSampler,
                 grammar: OutputGrammar | None, n_vocab: int) -> LlamaSampler | GrammarSampler:
    """The chain alone, or wrapped so the grammar checks its pick first (grammar_sampler.py
    says why)."""
    if grammar is None:
        return sampler
    from localchat.engine.grammar_sampler import GrammarSampler, init_grammar

    return GrammarSampler(llama_cpp, sampler, init_grammar(llama_cpp, vocab, grammar), n_vocab)


def token_logprob(llama_cpp: Any, llama: Any, token: int, top: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """log-softmax of the logits llama.cpp just computed: the chosen token's, and the `top`
    likeliest tokens'. Only when a request asks: ~0.1 ms a token for a 50k vocabulary."""
    import numpy

    n_vocab = llama.n_vocab()
    pointer = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
    logits = numpy.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(numpy.float64)
    peak = logits.max()
    log_total = peak + numpy.log(numpy.exp(logits - peak).sum())
    best: list[int] = []
    if top > 0:
        candidates = numpy.argpartition(logits, -top)[-top:]
        best = sorted(candidates.tolist(), key=lambda t: -logits[t])
    return TokenLogprob(
        token=piece(token), logprob=float(logits[token] - log_total),
        top=tuple((piece(t), float(logits[t] - log_total)) for t in best))
