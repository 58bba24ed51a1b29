"""Thinking models: what a budget saves, and what the KV cache keeps across turns.

    .venv/bin/python scripts/bench_thinking.py [--turns 5] [--budget 32] [--chat-budget 8]

Runs on the R1-style copy of the test model (SmolLM2 with DeepSeek's R1-distill template, whose
generation prompt opens <think>; tests/thinking_models.py builds it in a temp dir), greedy:

1. one question without and with --think-budget: tokens and seconds spent thinking and answering;
2. a chat of N turns with a budget (the end of turn ignored, so that this tiny model thinks and
   answers every turn as a real one does): prompt tokens reused from the KV cache vs processed,
   at each turn, for localchat (the last answer's cells kept past the thinking the template
   dropped) and for a naive replay (the reply kept as generated, thinking included, and only
   the shared prefix of the cache reused: what localchat did before it knew thinking models).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localchat.engine import kv_reuse  # noqa: E402
from localchat.engine.loader import load_engine  # noqa: E402
from localchat.engine.local import LocalEngine  # noqa: E402
from localchat.engine.options import EngineOptions  # noqa: E402
from localchat.engine.protocol import Sampling  # noqa: E402
from localchat.engine.reasoning import REASONING  # noqa: E402
from tests.thinking_models import make_copy  # noqa: E402

# Questions this small model thinks about past any small budget (it never closes the block
# itself), so that every turn has an answer after its thinking.
QUESTIONS = [f"Explain step by step how to {task}." for task in (
    "bake bread", "make pizza", "brew tea", "plant a tree", "fix a bicycle tyre", "paint a wall")]


def timed_reply(engine: LocalEngine, messages: list[dict[str, str]],
                sampling: Sampling) -> dict[str, float | int | str]:
    started = time.perf_counter()
    answer_at = None
    reasoning, answer = [], []
    for part in engine.stream_parts(messages, sampling):
        if part.kind == REASONING:
            reasoning.append(part.text)
        else:
            answer_at = answer_at or time.perf_counter()
            answer.append(part.text)
    ended = time.perf_counter()
    stats = engine.last_stats
    assert stats is not None
    thinking_s = (answer_at or ended) - started
    return {"reasoning": "".join(reasoning), "answer": "".join(answer),
            "raw": "<think>\n" + "".join(reasoning) + "\n</think>\n\n" + "".join(answer),
            "reasoning_tokens": stats.reasoning_tokens,
            "answer_tokens": stats.completion_tokens - stats.reasoning_tokens,
            "thinking_s": thinking_s, "answer_s": ended - (answer_at or ended),
            "prompt": stats.prompt_tokens, "reused": stats.cached_tokens,
            "processed": stats.prefill_tokens, "finish": stats.finish_reason}


def budget_figures(engine: LocalEngine, budget: int, max_tokens: int) -> None:
    print(f"\n| one question, -n {max_tokens} | thinking tokens | thinking s | answer tokens "
          "| answer s | finish |\n| --- | --- | --- | --- | --- | --- |")
    for label, think_budget in (("no budget", None), (f"--think-budget {budget}", budget)):
        engine.reset_cache()
        row = timed_reply(engine, [{"role": "user", "content": QUESTIONS[0]}],
                          Sampling(temperature=0, max_tokens=max_tokens,
                                   think_budget=think_budget))
        print(f"| {label} | {row['reasoning_tokens']} | {row['thinking_s']:.2f} | "
              f"{row['answer_tokens']} | {row['answer_s']:.2f} | {row['finish']} |")


def chat_figures(engine: LocalEngine, turns: int, sampling: Sampling) -> None:
    results: dict[str, list[dict]] = {}
    keep = kv_reuse.keep_answer_past_thinking
    for mode in ("localchat", "naive"):
        engine.reset_cache()
        if mode == "naive":  # prefix reuse only, as before this issue
            kv_reuse.keep_answer_past_thinking = lambda *args: 0
        messages: list[dict[str, str]] = []
        rows = []
        for turn in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            row = timed_reply(engine, messages, sampling)
            rows.append(row)
            content = row["answer"] if mode == "localchat" else row["raw"]
            messages.append({"role": "assistant", "content": str(content)})
        results[mode] = rows
    kv_reuse.keep_answer_past_thinking = keep
    print("\n| turn | prompt | localchat: reused / processed | naive: reused / processed "
          "| the last answer's tokens |\n| --- | --- | --- | --- | --- |")
    for turn in range(1, turns):
        ours, naive = results["localchat"][turn], results["naive"][turn]
        print(f"| {turn + 1} | {ours['prompt']} | {ours['reused']} / {ours['processed']} | "
              f"{naive['reused']} / {naive['processed']} | "
              f"{results['localchat'][turn - 1]['answer_tokens']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--budget", type=int, default=32, help="for the one question")
    parser.add_argument("--chat-budget", type=int, default=8,
                        help="for the chat: small, so that every turn has an answer to keep")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_test_model import default_dir, fetch

    with tempfile.TemporaryDirectory() as folder:
        model = make_copy(fetch(default_dir()), Path(folder) / "smollm2-r1.gguf",
                          (ROOT / "tests/data/deepseek-r1-distill-llama-8b.jinja").read_text(),
                          think_tokens=True)
        engine = load_engine(EngineOptions(model_path=model, n_ctx=4096, threads=args.threads))
        try:
            budget_figures(engine, args.budget, 2 * args.max_tokens)
            # SmolLM2 ends its turn at once from the second turn on; a real thinking model
            # thinks and answers every turn, so here the end of turn is ignored (-n ends it).
            chat_figures(engine, args.turns, Sampling(temperature=0, max_tokens=args.max_tokens,
                                                      think_budget=args.chat_budget,
                                                      ignore_eos=True))
        finally:
            engine.close()


if __name__ == "__main__":
    main()
