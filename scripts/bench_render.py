"""Benchmark: the cost of showing one token with MarkdownStream, early and late in a long answer.

Feeds a synthetic markdown answer (headings, paragraphs, lists, code, a table) in ~4-character
tokens to a MarkdownStream writing to a terminal-like rich Console on a StringIO, and prints the
mean and p95 cost per token over the first 100 tokens and over tokens 3,901-4,000. The target is
flat: the late tokens cost about what the early ones do. For comparison it times the naive way
(a rich Markdown of the whole answer, rendered for each token) at the same two lengths.

    .venv/bin/python scripts/bench_render.py

Not a test: timings depend on the machine. Warm-up first, then measure (nanoGPT's bench.py).
"""

from __future__ import annotations

import io
import random
import statistics
import time

from rich.console import Console
from rich.markdown import Markdown

from localchat.chat import markdown_stream
from localchat.chat.markdown_stream import MarkdownStream

# -----------------------------------------------------------------------------
answer_tokens = 4000  # the long answer the target names
window = 100  # tokens per measured window: the first 100, and the last 100 of the answer
chars_per_token = 4  # about one English BPE token
token_rate = 40.0  # simulated decode speed (tokens/s): decides how many tokens share a refresh
refresh_per_second = 15.0  # MarkdownStream's default
width, height = 100, 40  # a roomy terminal window
warmup_tokens = 600  # rich, markdown-it and the pygments lexers are loaded and cached first
naive_repeats = 5  # the naive render at 4,000 tokens takes long; a few samples suffice
seed = 1337  # the same synthetic answer on every run
# -----------------------------------------------------------------------------

WORDS = [
    "the", "model", "reads", "each", "token", "once", "and", "keeps", "a", "cache", "of",
    "its", "prefix", "so", "later", "turns", "only", "process", "what", "is", "new", "while",
    "finished", "blocks", "stay", "printed",
]  # fmt: skip


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 18))]
    spot = rng.randrange(len(words))
    words[spot] = rng.choice([f"**{words[spot]}**", f"`{words[spot]}()`", f"*{words[spot]}*"])
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, length: int) -> str:
    """A paragraph of exactly `length` characters, to make blocks end where we want."""
    text = ""
    while len(text) < length:
        text += sentence(rng) + " "
    return text[: length - 1].rstrip().ljust(length - 1, "x") + "."


def blocks(rng: random.Random) -> list[str]:
    """One round of the blocks chat models write."""
    code = "\n".join(f"    total += step({i}, 'value {i}')  # keep {i}" for i in range(20))
    rows = "\n".join(f"| {i} | {rng.choice(WORDS)} | {rng.randint(1, 999)} |" for i in range(6))
    return [
        "## Part",
        " ".join(sentence(rng) for _ in range(rng.randint(3, 6))),
        "\n\n".join(f"- {sentence(rng)}" for _ in range(5)),
        f"```python\ndef run():\n    total = 0\n{code}\n    return total\n```",
        "\n".join(f"{i + 1}. {sentence(rng)}" for i in range(4)),
        " ".join(sentence(rng) for _ in range(rng.randint(15, 25))),  # one long paragraph
        f"| n | word | count |\n|---|---|---|\n{rows}",
    ]


def synthetic_answer(rng: random.Random, tokens: int) -> str:
    """An answer whose last `window` tokens repeat its first ones, block state included.

    Then the early and the late window show the same text, 4,000 tokens apart: any difference
    in their cost comes from the length of the answer before them.
    """
    size = window * chars_per_token
    opening = "## Summary\n\n- first point\n- second point\n\n```python\nprint('hi')\n```\n\n"
    opening += paragraph(rng, size - len(opening) - 2) + "\n\n"
    middle_size = tokens * chars_per_token - 2 * size
    middle = ""
    while True:
        for block in blocks(rng):
            if len(middle) + len(block) + 2 > middle_size - 40:
                filler = paragraph(rng, middle_size - len(middle) - 2)
                return f"{opening}{middle}{filler}\n\n{opening}"
            middle += block + "\n\n"


def terminal() -> Console:
    return Console(
        file=io.StringIO(), force_terminal=True, color_system="truecolor",
        width=width, height=height,
    )


def stream_costs(tokens: list[str], refresh: float) -> list[float]:
    """Seconds spent in feed() for each token, on a simulated clock of `token_rate` tokens/s."""
    clock = [0.0]
    markdown_stream._now = lambda: clock[0]  # the stream's refresh throttle reads this clock
    stream = MarkdownStream(terminal(), refresh_per_second=refresh)
    costs = []
    for token in tokens:
        clock[0] += 1 / token_rate
        started = time.perf_counter()
        stream.feed(token)
        costs.append(time.perf_counter() - started)
    stream.finish()
    return costs


def naive_cost(text: str, repeats: int) -> list[float]:
    """Seconds to parse and render the whole answer so far, as re-rendering per token does."""
    console = terminal()
    costs = []
    for _ in range(repeats):
        started = time.perf_counter()
        console.print(Markdown(text))
        costs.append(time.perf_counter() - started)
    return costs


def summary(costs: list[float]) -> str:
    p95 = statistics.quantiles(costs, n=20)[-1] if len(costs) > 1 else costs[0]
    return f"mean {statistics.fmean(costs) * 1e3:7.3f} ms   p95 {p95 * 1e3:7.3f} ms"


def main() -> None:
    rng = random.Random(seed)
    answer = synthetic_answer(rng, answer_tokens)
    tokens = [answer[i : i + chars_per_token] for i in range(0, len(answer), chars_per_token)]
    late = slice(answer_tokens - window, answer_tokens)
    assert len(tokens) == answer_tokens and tokens[:window] == tokens[late]
    print(f"answer: {answer_tokens} tokens, {sum(map(len, tokens))} characters; "
          f"terminal {width}x{height}; simulated {token_rate:g} tokens/s")

    stream_costs(tokens[:warmup_tokens], refresh_per_second)  # warm-up, not measured
    naive_cost(answer[:2000], 2)

    for label, refresh in (
        (f"MarkdownStream, {refresh_per_second:g} refreshes/s", refresh_per_second),
        ("MarkdownStream, a refresh on every token (worst case)", float("inf")),
    ):
        costs = stream_costs(tokens, refresh)
        print(f"\n{label}")
        print(f"  tokens    1-{window:<5}  {summary(costs[:window])}")
        print(f"  tokens {late.start + 1}-{late.stop}  {summary(costs[late])}  (the same text)")
        print(f"  all {answer_tokens} tokens   {summary(costs)}")

    print("\nnaive: a rich Markdown of the whole answer so far, rendered for one token")
    for count in (window, answer_tokens):
        text = "".join(tokens[:count])
        print(f"  at {count:>5} tokens   {summary(naive_cost(text, naive_repeats))}")


if __name__ == "__main__":
    main()
