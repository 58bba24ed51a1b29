#!/usr/bin/env python3
"""--cache-type side by side: decode speed and KV memory of f16 and quantized caches.

Both engines live in one process and take turns, run by run (f16, q8_0, q4_0, f16, ...), so a
machine whose speed drifts from minute to minute slows them alike; each round's ratio to the f16
run next to it is reported, then the median and the range. KV memory is llama.cpp's own
serialized cache of the same tokens (`llama_state_seq_get_size`) and the size localchat reports.

    .venv/bin/python scripts/bench_cache_type.py MODEL.gguf --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localchat.engine.local import LocalEngine  # noqa: E402
from localchat.engine.options import EngineOptions  # noqa: E402
from localchat.engine.protocol import Sampling  # noqa: E402
from localchat.models.gguf_reader import read_model_file  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about the sea."}]


def main() -> int:
    """Load one engine per cache type, alternate decode runs, print ratios to f16."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", "--gen-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()
    info = read_model_file(args.model)
    engines = {kind: LocalEngine(EngineOptions(model_path=args.model, n_ctx=args.ctx,
                                               threads=args.threads, cache_type=kind), info)
               for kind in args.types}
    sampling = Sampling(temperature=0, ignore_eos=True, max_tokens=args.gen_tokens, draft="off")
    speeds: dict[str, list[float]] = {kind: [] for kind in args.types}
    state: dict[str, int] = {}
    for engine in engines.values():  # warm-up: page in the weights, start the threads
        "".join(engine.stream(PROMPT, Sampling(temperature=0, max_tokens=8, draft="off")))
    for number in range(args.rounds):
        for kind, engine in engines.items():
            engine.reset_cache()
            "".join(engine.stream(PROMPT, sampling))
            speeds[kind].append(engine.last_stats.decode_tokens_per_s or 0.0)
            state[kind] = len(engine.export_state()[1])
        print(f"round {number + 1}: " + ", ".join(f"{kind} {speeds[kind][-1]:.1f} tok/s"
                                                  for kind in args.types), flush=True)
    base = args.types[0]
    for kind in args.types:
        ratios = [ours / theirs for ours, theirs in zip(speeds[kind], speeds[base], strict=True)]
        kv = engines[kind].info.kv_cache_bytes or 0
        print(f"{kind:5} decode {statistics.median(speeds[kind]):6.1f} tok/s, / {base}: median "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
              f"KV cache {kv / 2**20:.1f} MiB ({kv / (engines[base].info.kv_cache_bytes or 1):.1%}"
              f"), llama.cpp state of {args.gen_tokens} tokens {state[kind] / 2**20:.2f} MiB "
              f"({state[kind] / state[base]:.1%})")
    for engine in engines.values():
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
