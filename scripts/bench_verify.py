#!/usr/bin/env python3
"""What a draft's verify step costs next to one token, and so the most drafting can gain here.

A verify step is one `llama_decode` of the current token and k drafted ones, with logits at
every position (each is sampled); a prompt batch of the same size needs them at its last
position only. Both are timed at a depth (the KV cells already filled, as after a piped file),
next to one token at the same depth, run by run so that the machine's drift hits them alike.
From the medians: the tokens per second a step gains if every draft is right, and, for drafts
right with chance p each (a run stops at the first wrong one), the best draft length and gain:
(1 - p^(k+1)) / (1 - p) tokens for the cost of a batch of k + 1.

    .venv/bin/python scripts/bench_verify.py MODEL.gguf --threads 1 --depth 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localchat.engine.local import LocalEngine  # noqa: E402
from localchat.engine.options import EngineOptions  # noqa: E402
from localchat.models.gguf_reader import read_model_file  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 17)  # 17: the current token and the longest draft (MAX_DRAFT)
ACCEPTANCE = (0.7, 0.8, 0.9, 0.95, 1.0)


class Timer:
    """Decodes of k tokens past `depth` cells, each removed again after it is timed."""

    def __init__(self, engine: LocalEngine, depth: int) -> None:
        import llama_cpp

        self._llama_cpp, self._depth = llama_cpp, depth
        llama = engine._llama
        vocab = llama.n_vocab()
        llama.eval([(i * 7919) % (vocab - 200) + 100 for i in range(depth)])
        self._ctx, self._memory = llama._ctx.ctx, llama._ctx.memory
        self._batch: Any = llama_cpp.llama_batch_init(max(SIZES), 0, 1)

    def time(self, k: int, every_position: bool) -> float:
        llama_cpp, batch, depth = self._llama_cpp, self._batch, self._depth
        for i in range(k):
            batch.token[i] = 1000 + i
            batch.pos[i] = depth + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if every_position or i == k - 1 else 0
        batch.n_tokens = k
        started = time.perf_counter()
        if llama_cpp.llama_decode(self._ctx, batch) != 0:
            raise SystemExit("llama_decode failed: is --depth within the context?")
        seconds = time.perf_counter() - started
        llama_cpp.llama_memory_seq_rm(self._memory, 0, depth, -1)
        return seconds

    def close(self) -> None:
        self._llama_cpp.llama_batch_free(self._batch)


def best_gain(verify: dict[int, float], p: float) -> tuple[int, float]:
    """(draft length, gain) that maximises expected tokens per unit of time."""
    best = (0, 1.0)
    for size, cost in verify.items():
        if size == 1:
            continue
        k = size - 1
        expected = float(size) if p == 1.0 else (1 - p ** size) / (1 - p)
        if expected / cost > best[1]:
            best = (k, expected / cost)
    return best


def main() -> int:
    """Time one token, verify steps and prompt batches at a depth; print ratios and gains."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--depth", type=int, default=2048, help="KV cells filled first")
    parser.add_argument("--cache-type", default="f16", choices=("f16", "q8_0", "q4_0"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    engine = LocalEngine(EngineOptions(model_path=args.model, n_ctx=args.depth + 64,
                                       threads=args.threads, cache_type=args.cache_type),
                         read_model_file(args.model))
    timer = Timer(engine, args.depth)
    runs: dict[tuple[int, bool], list[float]] = {}
    try:
        for k in SIZES:  # a round to warm caches and threads, not counted
            timer.time(k, True)
        for _ in range(args.rounds):
            for k in SIZES:
                for every in (True, False):
                    runs.setdefault((k, every), []).append(timer.time(k, every))
    finally:
        timer.close()
        engine.close()
    one = statistics.median(runs[(1, True)])
    verify = {k: statistics.median(runs[(k, True)]) / one for k in SIZES}
    print(f"{args.model.name}: {args.threads} thread(s), {args.cache_type} KV cache, depth "
          f"{args.depth}; one token {one * 1000:.1f} ms (median of {args.rounds})")
    print("batch  verify step  prompt batch  gain if every draft is right")
    for k in SIZES[1:]:
        prompt = statistics.median(runs[(k, False)]) / one
        print(f"{k:5}  {verify[k]:10.2f}x  {prompt:11.2f}x  {k / verify[k]:.2f}")
    for p in ACCEPTANCE:
        length, gain = best_gain(verify, p)
        print(f"drafts {p:.0%} right: best gain {gain:.2f}"
              + (f" with drafts of {length}" if length else " (no draft pays)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
