"""`bench --task`: the shipped workloads and their table, without a model; then one real run."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli

from localchat import bench_tasks
from localchat.engine.protocol import GenerationStats


def test_the_workloads_are_shipped_and_grouped():
    assert [t.name for t in bench_tasks.tasks("grounded")] == ["rename", "quote", "log"]
    assert [t.name for t in bench_tasks.tasks("open")] == ["story", "explain"]
    assert len(bench_tasks.tasks("all")) == len(bench_tasks.TASKS)
    rename = bench_tasks.TASKS[0].message()
    assert rename.count("\n") > 150 and "def parse(" in rename
    assert rename.endswith("\n\nRename the function parse to parse_config and return the whole "
                           "file.")


def stats(tokens: int, seconds: float, drafted: int = 0, accepted: int = 0,
          steps: int = 0) -> GenerationStats:
    return GenerationStats(10, 9, tokens, 0.1, 0.1, seconds, "length", draft_tokens=drafted,
                           draft_accepted=accepted, draft_steps=steps)


def test_the_record_gives_medians_ratios_and_acceptance():
    result = bench_tasks.TaskResult(bench_tasks.TASKS[0], prompt_tokens=1700)
    result.runs = {"off": [stats(101, 2.0), stats(101, 4.0)],
                   "ngram": [stats(101, 1.0, 80, 60, 20), stats(101, 2.0, 80, 60, 20)]}
    result.cpu_rates = {"off": [50.0, 50.0], "ngram": [60.0, 60.0]}
    [row] = bench_tasks.task_record([result])
    assert row["decode_tokens_per_s_off"] == 37.5  # the median of 50 and 25
    assert row["speedup"] == 2.0 and row["speedup_cpu"] == 1.2
    assert row["draft_acceptance"] == 0.75 and row["tokens_per_verify_step"] == 4.0
    [cells] = bench_tasks.task_rows([row])
    assert cells[0] == "rename" and cells[-1] == "yes" and "2.00x" in cells


def test_an_unknown_task_group_is_a_usage_error(tmp_path):
    result = run_cli("bench", str(tmp_path / "m.gguf"), "--task", "closed")
    assert result.exit_code == 2 and "--task must be one of grounded, open, all" in result.stderr


@pytest.mark.slow
def test_bench_task_open_runs_both_modes_with_the_same_text(smollm2_path, monkeypatch):
    monkeypatch.setattr(bench_tasks, "TASKS", tuple(
        bench_tasks.Task(t.name, t.kind, t.instruction, 24, t.file) for t in bench_tasks.TASKS))
    result = run_cli("bench", str(smollm2_path), "--task", "open", "--repetitions", "1",
                     "--threads", "1", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["tasks"]
    assert [row["task"] for row in rows] == ["story", "explain"]
    assert all(row["same_text"] and row["completion_tokens"] == 24 for row in rows)
