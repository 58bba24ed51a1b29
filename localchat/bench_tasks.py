"""`localchat bench --task`: shipped workloads, decoded with drafts off and on, side by side.

Grounded workloads are replies that repeat their input (rewrite a piped file with one change,
quote a document, pick lines out of a log), where prompt-lookup drafts pay; open-ended ones
(a story, an explanation) are where drafting must cost nothing. The files live in
`localchat/bench_data/`, so anyone can reproduce a figure, and `scripts/bench_native.py --task`
runs the same messages through llama.cpp's own `llama-cli`.

Each run is greedy from the same KV cache state (the prompt evaluated once, then every run
re-evaluates its last token), so the two modes must give the same text, and they are checked.
Besides wall-clock speed, each run's tokens per CPU-second of this process are reported: on a
machine shared with other work, being scheduled out slows wall time by far more than the
difference being measured, while the CPU time a run needs hardly moves (with one thread it is
the decode loop's own; with more it counts their spinning too).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from localchat.engine.protocol import GenerationStats, Sampling

TASK_GROUPS = ("grounded", "open", "all")
MODES = ("off", "ngram")


@dataclass(frozen=True)
class Task:
    """One workload: a shipped file (or none) followed by an instruction, as `run` sends it."""

    name: str
    kind: str  # grounded | open
    instruction: str
    max_tokens: int
    file: str | None = None  # in localchat/bench_data/

    def message(self) -> str:
        """The user message: the file, a blank line, the instruction (oneshot.compose_prompt)."""
        if self.file is None:
            return self.instruction
        text = resources.files("localchat.bench_data").joinpath(self.file).read_text("utf-8")
        return f"{text.strip(chr(10))}\n\n{self.instruction}"


TASKS = (
    Task("rename", "grounded", "Rename the function parse to parse_config and return the whole "
         "file.", 512, "config_loader.py.txt"),
    Task("quote", "grounded", "Quote, word for word, every rule above that mentions a charge in "
         "pounds or pence.", 320, "library_rules.md"),
    Task("log", "grounded", "List every ERROR line of the log above, exactly as written.", 320,
         "service.log"),
    Task("story", "open", "Write a long story about a lighthouse keeper who finds a message in a "
         "bottle.", 320),
    Task("explain", "open", "Explain how a refrigerator keeps food cold, step by step.", 320),
)


def tasks(group: str) -> tuple[Task, ...]:
    """The workloads of a group: grounded, open or all."""
    return tuple(task for task in TASKS if group in ("all", task.kind))


@dataclass
class TaskResult:
    """Every measured run of one workload, per drafting mode."""

    task: Task
    prompt_tokens: int = 0
    runs: dict[str, list[GenerationStats]] = field(default_factory=lambda: {m: [] for m in MODES})
    cpu_rates: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    same_text: bool = True  # every run of every mode gave the text of the first

    def median(self, mode: str, name: str) -> float | None:
        """The median of a stats property over a mode's runs (None where it has no value)."""
        values = [v for v in (getattr(s, name) for s in self.runs[mode]) if v is not None]
        return statistics.median(values) if values else None


def run_tasks(engine: Any, group: str, repetitions: int,
              progress: Callable[[str], None] | None = None) -> list[TaskResult]:
    """Each workload of `group`, `repetitions` times with drafts off and on, alternating."""
    results = []
    for task in tasks(group):
        messages = [{"role": "user", "content": task.message()}]
        result = TaskResult(task, prompt_tokens=engine.count_tokens(messages))
        engine.reset_cache()
        _reply(engine, messages, 2, "off")  # the prompt once (and a warm-up); runs reuse it
        first: str | None = None
        for repetition in range(repetitions):
            order = MODES if repetition % 2 == 0 else MODES[::-1]  # neither always goes first
            for mode in order:
                if progress:
                    progress(f"{task.name}: draft {mode}, run {repetition + 1}/{repetitions}")
                started = time.process_time()
                text, stats = _reply(engine, messages, task.max_tokens, mode)
                cpu_s = time.process_time() - started
                first = text if first is None else first
                result.same_text &= text == first
                result.runs[mode].append(stats)
                result.cpu_rates[mode].append(stats.completion_tokens / cpu_s if cpu_s else 0.0)
        results.append(result)
    return results


def _reply(engine: Any, messages: list[dict[str, str]], max_tokens: int,
           mode: str) -> tuple[str, GenerationStats]:
    text = "".join(engine.stream(messages, Sampling(temperature=0, max_tokens=max_tokens,
                                                    draft=mode)))
    return text, engine.last_stats


def task_record(results: list[TaskResult]) -> list[dict[str, Any]]:
    """The `--json` rows: per workload, the median decode speed of each mode and the ratio."""
    rows = []
    for result in results:
        off = result.median("off", "decode_tokens_per_s")
        on = result.median("ngram", "decode_tokens_per_s")
        cpu_off = statistics.median(result.cpu_rates["off"]) if result.cpu_rates["off"] else None
        cpu_on = statistics.median(result.cpu_rates["ngram"]) if result.cpu_rates["ngram"] \
            else None
        rows.append({
            "task": result.task.name, "kind": result.task.kind,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.runs["ngram"][0].completion_tokens
            if result.runs["ngram"] else None,
            "decode_tokens_per_s_off": _round(off), "decode_tokens_per_s_ngram": _round(on),
            "speedup": _round(on / off if on and off else None, 3),
            "cpu_tokens_per_s_off": _round(cpu_off), "cpu_tokens_per_s_ngram": _round(cpu_on),
            "speedup_cpu": _round(cpu_on / cpu_off if cpu_on and cpu_off else None, 3),
            "decode_off_all": [_round(s.decode_tokens_per_s) for s in result.runs["off"]],
            "decode_ngram_all": [_round(s.decode_tokens_per_s) for s in result.runs["ngram"]],
            "draft_acceptance": _round(result.median("ngram", "draft_acceptance"), 3),
            "tokens_per_verify_step": _round(result.median("ngram", "tokens_per_verify_step")),
            "same_text": result.same_text,
        })
    return rows


def task_rows(record: list[dict[str, Any]]) -> list[list[str]]:
    """The table `localchat bench --task` prints."""
    def rate(value: float | None) -> str:
        return f"{value:,.1f}" if value is not None else "-"

    return [[row["task"], row["kind"], f"{row['prompt_tokens']:,} + {row['completion_tokens']}",
             rate(row["decode_tokens_per_s_off"]), rate(row["decode_tokens_per_s_ngram"]),
             f"{row['speedup']:.2f}x" if row["speedup"] else "-",
             f"{row['speedup_cpu']:.2f}x" if row["speedup_cpu"] else "-",
             f"{row['draft_acceptance']:.0%}" if row["draft_acceptance"] is not None else "-",
             rate(row["tokens_per_verify_step"]), "yes" if row["same_text"] else "NO"]
            for row in record]


TASK_COLUMNS = ["task", "kind", "tokens (prompt + reply)", "off tok/s", "ngram tok/s", "speedup",
                "speedup (CPU time)", "accepted", "tok/step", "same text"]


def _round(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None
