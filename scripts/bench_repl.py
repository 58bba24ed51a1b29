#!/usr/bin/env python3
"""Benchmark the chat: time to first token at turn 1 vs turn 20, and the renderer's cost per token.

Part one drives the REPL's own turn (`ChatSession.send`: fit the window, stream, render, keep)
through one conversation of --turns turns whose prompts are the same size and whose replies are
--reply-tokens long (end-of-turn ignored, so every turn adds the same amount of history). Time
to first token is measured as a person sees it: from sending the message to the first text on
stdout, so the window fitting and tokenizing of the whole history are included. The target:
turn 20 within 1.3x of turn 1, because each turn processes only what is new. For contrast, turn
20 is timed once more with the KV cache emptied: what every turn would cost without reuse.

Part two is scripts/bench_render.py (MarkdownStream's cost per token at 100 and 4,000 tokens),
run as is rather than duplicated.

    .venv/bin/python scripts/bench_repl.py                       # the test model
    .venv/bin/python scripts/bench_repl.py MODEL.gguf --threads 4 --turns 20

Not a test: timings depend on the machine and its load (printed with the figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A private LOCALCHAT_HOME, so nothing here touches the user's history or input history.
os.environ["LOCALCHAT_HOME"] = tempfile.mkdtemp(prefix="localchat-bench-repl-")
sys.path.insert(0, str(ROOT))

from localchat.chat.conversation import messages_for_model  # noqa: E402
from localchat.chat.session import ChatSession, ReplOptions  # noqa: E402
from localchat.engine.loader import load_engine  # noqa: E402
from localchat.engine.options import EngineOptions  # noqa: E402
from localchat.engine.protocol import Sampling  # noqa: E402
from localchat.oneshot import Request  # noqa: E402
from localchat.render import Environment  # noqa: E402


def load_script(name: str):
    """Another script in scripts/, as a module (scripts are tools, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FirstText(io.StringIO):
    """stdout that notes when the first text of a reply arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.first_at: float | None = None

    def write(self, text: str) -> int:
        if text and self.first_at is None:
            self.first_at = time.perf_counter()
        return super().write(text)


def prompt(turn: int) -> str:
    # Same words, same two-digit number format: every prompt tokenizes to the same size.
    return f"Fact {turn:02d}: tell me one short thing about the number {turn:02d}."


def one_conversation(engine, turns: int, sampling: Sampling) -> list[dict]:
    """Run one chat from an empty cache; per turn: ttft, prompt tokens, tokens processed."""
    engine.reset_cache()
    stdout = FirstText()
    request = Request(model="bench", prompt=None, system=None, sampling=sampling,
                      engine=engine.options, history=False)
    chat = ChatSession(request, Environment(stdout=stdout, stderr=io.StringIO()),
                       ReplOptions(markdown=False), None, engine, owns_engine=False)
    rows = []
    for turn in range(1, turns + 1):
        stdout.first_at = None
        started = time.perf_counter()
        chat.send(prompt(turn))
        stats = engine.last_stats
        rows.append({"ttft": stdout.first_at - started, "prompt": stats.prompt_tokens,
                     "processed": stats.prefill_tokens})
    # The last turn again with an empty cache: what it costs when nothing is reused.
    engine.reset_cache()
    messages = messages_for_model(chat.conversation.without_last_reply())
    started = time.perf_counter()
    stream = engine.stream(messages, sampling)
    next(stream)
    ttft = time.perf_counter() - started
    stream.close()  # the engine's stats are final once the stream is closed
    stats = engine.last_stats
    rows.append({"ttft": ttft, "prompt": stats.prompt_tokens, "processed": stats.prefill_tokens})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="a .gguf file [default: test model]")
    parser.add_argument("--threads", type=int, default=None, help="[default: physical cores]")
    parser.add_argument("--ctx", type=int, default=4096, help="context window (no trims here)")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--reply-tokens", type=int, default=32, help="tokens in every reply")
    parser.add_argument("--repetitions", type=int, default=3, help="conversations measured")
    parser.add_argument("--skip-render", action="store_true", help="only part one")
    parser.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                        help="llama.cpp's attention without flash attention (on by default)")
    args = parser.parse_args()

    model = args.model or load_script("fetch_test_model").fetch(
        load_script("fetch_test_model").default_dir())
    engine = load_engine(EngineOptions(model_path=model, n_ctx=args.ctx, threads=args.threads,
                                       flash_attn=args.flash_attn))
    # Greedy and end-of-turn ignored: every reply is exactly --reply-tokens long.
    sampling = Sampling(temperature=0.0, max_tokens=args.reply_tokens, ignore_eos=True)
    print(f"model {model.name} · ctx {engine.n_ctx} · {engine.info.threads} thread(s) · "
          f"flash attention {'on' if args.flash_attn else 'off'} · "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    one_conversation(engine, 2, sampling)  # warm-up: caches, page faults, lazy imports
    runs = [one_conversation(engine, args.turns, sampling) for _ in range(args.repetitions)]
    engine.close()

    def median(turn: int, key: str) -> float:
        return statistics.median(run[turn][key] for run in runs)

    first, last = 0, args.turns - 1
    print(f"\ntime to first token, median of {args.repetitions} conversations "
          f"({args.reply_tokens}-token replies):")
    for label, turn in (("1", first), (str(args.turns), last)):
        print(f"  turn {label:<4} {median(turn, 'ttft') * 1e3:8.1f} ms   prompt "
              f"{median(turn, 'prompt'):5.0f} tokens, {median(turn, 'processed'):4.0f} processed")
    ratio = median(last, "ttft") / median(first, "ttft")
    verdict = "meets" if ratio <= 1.3 else "MISSES"
    print(f"  ratio     {ratio:8.2f}x  ({verdict} the 1.3x target)")
    print(f"  turn {args.turns}, empty cache: {median(last + 1, 'ttft') * 1e3:.1f} ms "
          f"({median(last + 1, 'processed'):.0f} tokens processed): the cost without reuse")
    spread = [run[t]["ttft"] * 1e3 for run in runs for t in range(args.turns)]
    print(f"  every turn: min {min(spread):.1f} ms, max {max(spread):.1f} ms")

    if not args.skip_render:
        print("\nrenderer (scripts/bench_render.py):")
        load_script("bench_render").main()


if __name__ == "__main__":
    main()
