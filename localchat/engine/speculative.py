"""Prompt-lookup speculative decoding: more than one token for each read of the weights.

Decoding one token reads every weight once; evaluating a batch of a few tokens costs little more
where that read dominates. When the last few tokens of the context (prompt and reply so far)
occurred earlier, the tokens that followed them then are a guess for what comes next (a draft):
the model evaluates the current token and the draft in one `llama_decode`, the sampler picks a
token at each position from the model's own logits, and the draft is kept for as long as the
picks agree with it. The first disagreement is itself the next token (the model's own choice),
so a step gives one to K+1 tokens, and the text is exactly the text of decoding one token at a
time wherever llama.cpp computes the same logits for a token alone and in a batch
(`inexact_reason` says where it does not; `BatchCheck` measures the rest): the same sampler
chain samples them in the same order, and only the tokens it picked ever reach it
(`llama_sampler_sample` accepts what it returns), so penalties, grammars and the random state
advance as without drafts. The KV cells of rejected draft tokens are removed before anything
else is evaluated.

Drafting adapts (`DraftPolicy`): it learns how often drafts of each n-gram length are accepted,
also from drafts it only imagined while it was paused (free: the reply shows whether they would
have been right), and how much a batch costs next to a single token on this machine; it drafts
the length that maximises the expected tokens per unit of cost, and nothing when no length pays.

`Stepper` is the whole interface to the decode loop: `sample()` the next token, `advance(token)`
to make it part of the context, `finish()` to leave the KV cache holding exactly the tokens that
were advanced (what `llama.input_ids[:n_tokens]` records).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy

NGRAM_MAX = 4  # the longest context suffix looked up; longer matches are tried first
NGRAM_MIN = 1
MAX_DRAFT = 16  # tokens in one draft, at most (llama.cpp's speculative default too)
# What a batch of m tokens costs next to one, as 1 + cost * (m - 1), before this process has
# timed any. Learnt online from the steps' own timings. A 2-core CPU running a 135M model, where
# decode is bound by arithmetic rather than by reading the weights, measures 0.6-1.0: there only
# near-certain drafts pay, so the prior is cautious; a GPU or a memory-bound model measures far
# less, which the first few drafts reveal.
PRIOR_COST = 0.75
COST_BOUNDS = (0.02, 2.0)
# Acceptance before any evidence, per n-gram length: longer matches are more often right.
PRIOR_ACCEPTANCE = {1: 0.3, 2: 0.5, 3: 0.6, 4: 0.7}
PRIOR_WEIGHT = 2.0  # the prior counts as this many drafts' worth of evidence
DECAY = 0.9  # evidence fades: a reply that starts quoting its input is noticed within a few drafts
TIMING_DECAY = 0.8
MIN_GAIN = 1.05  # draft only when it is expected to pay at least this much (noise margin)


def inexact_reason(gpu: bool, threads: int, flash_attn: bool,
                   cache_type: str = "f16") -> str | None:
    """Why drafts are known to change the text on this engine, so `--draft auto` does not even
    try; None where it measures (`BatchCheck`) and drafts in what matched.

    The sampler picks from the same logits either way only if they are the same to the last
    bit, and llama.cpp does not promise that. Without flash attention a batch's attention
    products take another kernel. On the CPU with several threads and an f16 KV cache, flash
    attention for one token over 512 KV cells or more splits the cells across threads and
    merges the parts (ggml's `use_split_kv_path`, never taken for a batch or a quantized
    cache). Other differences no rule here can list: repacked matrix kernels (Q4_0, Q4_K,
    IQ4_NL on AVX2) compute a batch's rows unlike one token's even on one thread, and a GPU
    has its own kernels. Where two tokens are then within rounding of each other, greedy
    decoding can take the other one (llama.cpp's own speculative decoding has the same
    property).
    """
    if not flash_attn:
        return "without flash attention, llama.cpp's batched attention rounds differently"
    if not gpu and threads > 1 and cache_type == "f16":
        return (f"with {threads} threads and an f16 KV cache, llama.cpp divides one token's "
                "attention across threads unlike a batch's, so the last bits of the logits "
                "can differ (--cache-type q8_0 avoids it)")
    return None


def drafts(mode: str, inexact: str | None) -> bool:
    """Whether a reply drafts: `ngram` always, `auto` only where drafts may keep the text (no
    `inexact_reason`, nothing measured otherwise), `off` never."""
    return mode == "ngram" or (mode == "auto" and inexact is None)


class BatchCheck:
    """What one engine has measured for `--draft auto`: the batch shapes whose every row of
    logits was, to the last bit, what the same tokens got evaluated alone; or why drafting
    stopped.

    A shape is a batch size with the power of two of its first position: llama.cpp picks
    kernels by both (a repacked kernel's gemm from 4 rows, attention over 512 cells or more
    another path). Drafts of a shape are kept only once it matched. To measure one, the reply
    goes on one token at a time until it has as many tokens evaluated alone as the batch
    holds, their logits kept; those tokens are evaluated again as one batch, and every row is
    compared (a first row can match where the later ones, which attend to cells the batch
    wrote, do not). That costs one batch per shape; a difference stops drafting for the
    engine's life, and the tokens are evaluated alone again, so the text never changes.
    """

    def __init__(self) -> None:
        self.matched: set[tuple[int, int]] = set()
        self.failed: str | None = None  # the measured reason drafting stopped

    @staticmethod
    def shape(size: int, start: int) -> tuple[int, int]:
        return size, start.bit_length()


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's
    last n-gram (n from NGRAM_MAX down to NGRAM_MIN)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: list[int] = []
        # n-gram -> the position of the token that followed its latest occurrence
        self._index: dict[tuple[int, ...], int] = {}
        self._tail: tuple[int, ...] = ()  # the last NGRAM_MAX tokens: every key is a slice of it
        for token in tokens:
            self.push(token)

    def push(self, token: int) -> None:
        """Append a token of the context; index the n-grams that now have a follower."""
        tail, index, end = self._tail, self._index, len(self.tokens)
        for n in range(NGRAM_MIN, len(tail) + 1):
            index[tail[-n:]] = end
        self.tokens.append(token)
        self._tail = (tail + (token,))[-NGRAM_MAX:]

    def propose(self, limit: int) -> tuple[int, list[int]]:
        """(n, draft): the matched n-gram length and up to `limit` tokens; (0, []) for none."""
        tail, index = self._tail, self._index
        for n in range(len(tail), NGRAM_MIN - 1, -1):
            start = index.get(tail[-n:])
            if start is not None:
                return n, self.tokens[start:start + limit]
        return 0, []


class DraftPolicy:
    """How long a draft to send, from learnt acceptance and measured batch cost."""

    def __init__(self, cost: float | None = None) -> None:
        """`cost`: a fixed batch cost instead of the one measured here (for tests)."""
        self._hits = {n: PRIOR_WEIGHT * p for n, p in PRIOR_ACCEPTANCE.items()}
        self._misses = {n: PRIOR_WEIGHT * (1 - p) for n, p in PRIOR_ACCEPTANCE.items()}
        self.cost = PRIOR_COST if cost is None else cost
        self._measure = cost is None
        self._single_s: float | None = None  # smoothed time of a one-token step

    def acceptance(self, n: int) -> float:
        """The learnt chance that a draft token after an n-gram match is accepted."""
        hits, misses = self._hits[n], self._misses[n]
        return hits / (hits + misses)

    def size(self, n: int, available: int) -> int:
        """The draft length (0: none) that maximises expected tokens per unit of cost.

        With acceptance p per token (each given the ones before), a draft of k yields
        (1 - p^(k+1)) / (1 - p) tokens for a cost of 1 + cost * k single steps.
        """
        p, cost = self.acceptance(n), self.cost
        best, best_gain, expected, power = 0, MIN_GAIN, 1.0, 1.0
        for k in range(1, available + 1):
            power *= p
            expected += power
            gain = expected / (1 + cost * k)
            if gain > best_gain:
                best, best_gain = k, gain
            elif power < 0.02:
                break  # later tokens add almost nothing but cost
        return best

    def record(self, n: int, drafted: int, accepted: int) -> None:
        """A draft (real or imagined) of `drafted` tokens, the first `accepted` of them right."""
        for table in (self._hits, self._misses):
            table[n] *= DECAY
        self._hits[n] += accepted
        self._misses[n] += accepted < drafted  # a geometric run: one miss ends it

    def timed(self, batch: int, seconds: float) -> None:
        """A step of `batch` tokens took `seconds`: keep the batch cost model current."""
        if not self._measure:
            return
        if batch == 1:
            single = self._single_s
            self._single_s = seconds if single is None else \
                TIMING_DECAY * single + (1 - TIMING_DECAY) * seconds
        elif self._single_s:
            sample = (seconds / self._single_s - 1) / (batch - 1)
            low, high = COST_BOUNDS
            self.cost = TIMING_DECAY * self.cost + (1 - TIMING_DECAY) * min(max(sample, low),
                                                                            high)


@dataclass
class DraftCounters:
    """What drafting did in one reply (all zero with drafting off)."""

    drafted: int = 0  # draft tokens sent to be verified
    accepted: int = 0  # of them, taken into the reply
    steps: int = 0  # verify steps: decodes that carried a draft


class Stepper:
    """Evaluate tokens and sample the next ones, a draft riding along with each evaluation.

    The llama.cpp objects come from a loaded `llama_cpp.Llama` whose last evaluation left the
    logits to sample from at batch index -1 (a prompt just evaluated).
    """

    def __init__(self, llama: Any, llama_cpp: Any, sampler: Any, history: Sequence[int] | None,
                 n_ctx: int, policy: DraftPolicy | None = None, eog_banned: bool = False,
                 check: BatchCheck | None = None) -> None:
        """`check`: measure each batch shape against a token alone before keeping its drafts
        (None: drafts are kept as they are verified)."""
        self._llama, self._n_ctx = llama, n_ctx
        # A LlamaSampler's chain is sampled directly; a wrapper without one (the grammar's,
        # engine/grammar_sampler.py) samples through its own sample(ctx, idx).
        self._sampler = getattr(sampler, "sampler", None)
        self._wrapper = sampler
        self._ctx = llama._ctx.ctx
        self._memory = llama._ctx.memory
        self._batch = llama._batch.batch
        self._input_ids = llama.input_ids
        self._decode = llama_cpp.llama_decode
        self._sample = llama_cpp.llama_sampler_sample
        self._seq_rm = llama_cpp.llama_memory_seq_rm
        self._capacity = llama._batch._n_tokens
        self._drafter = NgramDrafter(history) if history is not None else None
        self._check = check  # once it failed, the engine passes no history: no drafter
        self._policy = policy or DraftPolicy()
        self.counters = DraftCounters()
        self._index = -1  # the batch index whose logits the next sample reads
        self._wanted = 0  # a batch size to measure before drafts of it are kept
        self._alone: list[tuple[int, numpy.ndarray]] = []  # (position, logits) of the last
        # tokens evaluated alone, one after another, while a measurement waits for them
        self._logits_ith = llama_cpp.llama_get_logits_ith
        self._row = ctypes.c_float * llama.n_vocab()
        self._draft: list[int] = []  # drafted tokens in the KV cache past n_tokens
        self._taken = 0  # of the draft, tokens advanced through so far
        self._n = 0  # the draft's n-gram length
        self._shadow: list[int] = []  # a draft imagined while paused, checked against the reply
        self._shadow_taken = 0
        self._shadow_n = 0
        batch = self._batch
        for i in range(min(self._capacity, MAX_DRAFT + 1)):
            batch.seq_id[i][0] = 0
            batch.n_seq_id[i] = 1
        if self._sampler is None:
            self.sample = self._sample_wrapped  # type: ignore[method-assign]
        elif _plain_greedy(llama_cpp, self._sampler, eog_banned):
            self._is_eog = llama_cpp.llama_vocab_is_eog
            self._vocab = llama._model.vocab
            self._eog_banned = eog_banned
            self.sample = self._argmax  # type: ignore[method-assign]

    def sample(self) -> int:
        """The next token, sampled by the chain from the current position's logits."""
        return int(self._sample(self._sampler, self._ctx, self._index))

    def _sample_wrapped(self) -> int:
        return int(self._wrapper.sample(self._llama._ctx, self._index))

    def _argmax(self) -> int:
        """What a chain of only greedy picks, without the chain's copy of the whole vocabulary
        into candidates (a quarter of a millisecond a token for a 49k vocabulary)."""
        token = int(self._logits(self._index).argmax())  # the first maximum,
        # as llama.cpp's greedy sampler picks it
        if self._eog_banned and self._is_eog(self._vocab, token):
            return int(self._sample(self._sampler, self._ctx, self._index))  # its bias decides
        return token

    def _logits(self, index: int) -> numpy.ndarray:
        """The logits at a batch index, read in place (the next decode overwrites them)."""
        logits = self._logits_ith(self._ctx, index)
        row = self._row.from_address(ctypes.cast(logits, ctypes.c_void_p).value)
        return numpy.frombuffer(row, dtype=numpy.float32)

    def advance(self, token: int, room: int | None = None) -> None:
        """Make `token` (just sampled) part of the context; `room` caps the tokens still wanted
        after it (None: no cap), so no draft outruns a max-tokens limit."""
        llama = self._llama
        n = llama.n_tokens
        drafter = self._drafter
        if drafter is not None:
            drafter.push(token)
        draft = self._draft
        if draft:
            if token == draft[self._taken]:  # already evaluated: its logits are next in the batch
                self._input_ids[n] = token
                llama.n_tokens = n + 1
                self._taken += 1
                self._index = self._taken
                self.counters.accepted += 1
                if self._taken == len(draft):
                    self._policy.record(self._n, len(draft), len(draft))
                    self._draft = []
                return
            self._policy.record(self._n, len(draft), self._taken)
            self._seq_rm(self._memory, 0, n, -1)  # the rejected draft's cells
            self._draft = []
        elif self._shadow:
            self._check_shadow(token)
        if self._wanted and len(self._alone) >= self._wanted:
            self._measure(n)
        if self._drafter is not None:
            self._propose(n, room)
        self._evaluate(token, n)

    def _propose(self, n: int, room: int | None) -> None:
        limit = min(MAX_DRAFT, self._capacity - 1, self._n_ctx - 2 - n)
        if room is not None:
            limit = min(limit, room - 1)
        if limit <= 0 or self._shadow:
            return
        assert self._drafter is not None
        matched, tokens = self._drafter.propose(limit)
        if not tokens:
            return
        size = self._policy.size(matched, len(tokens))
        check = self._check
        if size and check is not None:
            # Drafts of 1, 2, 4, 8 or 16 tokens: few shapes to measure. One not matched yet is
            # measured once that many tokens were evaluated alone; meanwhile the longest
            # draft of a shape already matched, if any.
            size = 1 << (size.bit_length() - 1)
            if check.shape(size + 1, n) not in check.matched:
                self._wanted = max(self._wanted, size + 1)
                while size and check.shape(size + 1, n) not in check.matched:
                    size >>= 1
        if size:
            self._draft, self._taken, self._n = tokens[:size], 0, matched
        else:  # paused: still learn whether this draft would have been right
            self._shadow, self._shadow_taken, self._shadow_n = tokens, 0, matched

    def _check_shadow(self, token: int) -> None:
        shadow = self._shadow
        if token == shadow[self._shadow_taken]:
            self._shadow_taken += 1
            if self._shadow_taken < len(shadow):
                return
        self._policy.record(self._shadow_n, len(shadow), self._shadow_taken)
        self._shadow = []

    def _evaluate(self, token: int, n: int) -> None:
        """Evaluate `token` at position n and the draft after it, in one llama_decode."""
        draft = self._draft
        self._run([token, *draft], n)
        if draft:
            self.counters.drafted += len(draft)
            self.counters.steps += 1
            self._alone = []
        elif self._wanted:  # keep the logits: a measurement compares them with a batch's
            self._alone = self._alone[1 - self._wanted:] + [(n, self._logits(0).copy())]
        self._input_ids[n] = token
        self._llama.n_tokens = n + 1
        self._index = 0

    def _run(self, tokens: list[int], start: int) -> None:
        """One llama_decode of `tokens` from position `start`, with logits at each."""
        batch = self._batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.logits[i] = 1
        batch.n_tokens = len(tokens)
        started = time.perf_counter()
        code = self._decode(self._ctx, batch)
        self._policy.timed(len(tokens), time.perf_counter() - started)
        if code != 0:
            self._draft = []
            self._seq_rm(self._memory, 0, start, -1)
            self._llama.n_tokens = min(self._llama.n_tokens, start)
            raise RuntimeError(f"llama_decode returned {code}")

    def _measure(self, n: int) -> None:
        """Evaluate the last tokens evaluated alone again, as one batch of the wanted size, and
        compare every row of its logits with theirs, bit for bit; on a difference, drafting
        stops and those tokens are evaluated alone again, so the cache is what it was."""
        check, size = self._check, self._wanted
        assert check is not None
        alone, start = self._alone[-size:], n - size
        assert alone[0][0] == start and alone[-1][0] == n - 1  # one after another, just now
        self._wanted, self._alone = 0, []
        tokens = [self._input_ids[position] for position, _ in alone]
        self._seq_rm(self._memory, 0, start, -1)
        self._run(tokens, start)
        if all(self._logits(i).tobytes() == logits.tobytes()
               for i, (_, logits) in enumerate(alone)):
            check.matched.add(check.shape(size, start))
            return
        check.failed = (f"measured: llama.cpp gave tokens other logits in a batch of {size} "
                        f"than alone (at position {start})")
        self._drafter, self._shadow = None, []
        self._seq_rm(self._memory, 0, start, -1)
        for position, token in enumerate(tokens, start):
            self._run([token], position)

    def evaluated(self, tokens: Sequence[int]) -> None:
        """`tokens` were evaluated outside (`llama.eval`, which first drops the cells past
        n_tokens, so those of a draft not taken): forget the draft, and sample next from the
        logits of their last token."""
        if self._draft:
            self._policy.record(self._n, len(self._draft), self._taken)
            self._draft = []
        self._shadow, self._alone = [], []
        if self._drafter is not None:
            for token in tokens:
                self._drafter.push(token)
        self._index = -1

    def finish(self) -> None:
        """Drop the cells of a draft not advanced through: the KV cache then holds exactly
        `llama.input_ids[:n_tokens]`, as if no token had ever been drafted."""
        if self._draft:
            self._seq_rm(self._memory, 0, self._llama.n_tokens, -1)
            self._draft = []


def _plain_greedy(llama_cpp: Any, chain: Any, eog_banned: bool) -> bool:
    """True when the chain only picks the likeliest token (after banning end-of-generation
    tokens, with `eog_banned`): stateless, so an argmax of the logits is the same pick. Read
    from the chain itself, so a sampler added to it (penalties, a grammar) turns this off."""
    names = [llama_cpp.llama_sampler_name(llama_cpp.llama_sampler_chain_get(chain, i))
             for i in range(llama_cpp.llama_sampler_chain_n(chain))]
    expected = [b"logit-bias", b"greedy"] if eog_banned else [b"greedy"]
    return names == expected
