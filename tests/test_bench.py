"""`localchat bench` with the real model, its machine measurements, and bench_native's parsers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
from cli_runner import CliResult, run_cli
from gguf_factory import write_tiny_gguf

from localchat import bench
from localchat.engine.loader import load_engine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.models.gguf_reader import read_model_file
from localchat.render import format_bytes

ROOT = Path(__file__).resolve().parent.parent
MB, MIB = 1_000_000, 1024 * 1024
# The runs below use one thread: these tests time nothing, and on a machine busy with other
# tests llama.cpp's per-op thread barriers stall whenever one of two threads loses its core
# (measured here: 3-4x slower with --threads 2 at a load average of 7).


def assert_usage_error(result: CliResult, *needles: str) -> None:
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    loaded = load_engine(EngineOptions(model_path=smollm2_path, n_ctx=512, threads=1))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def native():
    spec = importlib.util.spec_from_file_location("bench_native",
                                                  ROOT / "scripts" / "bench_native.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# --- the command, end to end ---------------------------------------------------------------

@pytest.mark.slow
def test_json_has_medians_spreads_and_every_run(smollm2_path):
    result = run_cli("bench", str(smollm2_path), "-p", "48", "-n", "8", "--repetitions", "2",
                       "--threads", "1", "--ctx", "256", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # no progress bar or llama.cpp log in a pipe
    record = json.loads(result.stdout)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "load_s",
                "peak_rss_mb", "kv_cache_mb", "memory_bandwidth_gb_per_s",
                "decode_ceiling_tokens_per_s", "decode_fraction_of_ceiling"):
        assert record[key] > 0, key
    assert (record["n_ctx"], record["threads"], record["interrupted"]) == (256, 1, False)
    runs = record["runs"]
    cold = record["page_cache"]["method"] == "fadvise"  # else the file could not be dropped
    assert (record["load_cold_s"] > 0) if cold else (record["load_cold_s"] is None)
    assert [(run["kind"], run["cache"]) for run in runs[:2 if cold else 1]] == [
        ("load", "cold"), ("load", "warm")][0 if cold else 1:]
    prefills = [run for run in runs if run["kind"] == "prefill"]
    decodes = [run for run in runs if run["kind"] == "decode"]
    assert [run["repetition"] for run in prefills] == [1, 2] == [r["repetition"] for r in decodes]
    for run in prefills:  # a prompt of exactly -p tokens, all evaluated, none reused
        assert run["tokens"] == 48
        assert run["tokens_per_s"] == pytest.approx(48 / run["seconds"])
        assert run["ttft_s"] > run["seconds"]  # the first token comes after the prefill
    for run in decodes:  # -n tokens, timed from the first to the last
        assert run["tokens"] == 8
        assert run["tokens_per_s"] == pytest.approx(7 / run["seconds"])
    for name in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_rss_mb"):
        spread = record["spread"][name]
        assert spread["min"] <= record[name] <= spread["max"]
    # The weights are mapped and read, so they are resident; the KV cache is sized from the file
    # (30 layers x 3 KV heads x (64 + 64) x f16 x 256 positions).
    assert record["peak_rss_mb"] > record["model_size_mb"]
    assert record["kv_cache_mb"] == pytest.approx(30 * 3 * 128 * 2 * 256 / MB, abs=0.1)  # 5.9
    assert record["page_cache"]["method"] in ("fadvise", "none")  # never the whole machine's
    assert len(record["load_average"]) == 3


@pytest.mark.slow
def test_table_on_stdout_in_a_pipe(smollm2_path):
    result = run_cli("bench", str(smollm2_path), "-p", "40", "-n", "4", "--repetitions", "1",
                       "--ctx", "128", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["figure", "median", "spread"]
    assert any(line.startswith("prefill (40 tokens)") and "tok/s" in line for line in lines)
    assert any(line.startswith("decode (4 tokens)") and "tok/s" in line for line in lines)
    assert "\x1b" not in result.stdout


@pytest.mark.parametrize(("args", "needles"), [
    (["-p", "0"], ["-p must be at least 1", "got 0"]),
    (["-n", "0"], ["-n must be at least 2", "got 0"]),
    (["--repetitions", "0"], ["--repetitions"]),
    (["-p", "abc"], ["-p"]),
])
def test_bad_sizes_are_usage_errors_before_loading(args, needles, tmp_path):
    # The model path does not exist: the sizes are refused before anything is loaded.
    assert_usage_error(run_cli("bench", str(tmp_path / "missing.gguf"), *args), *needles)


@pytest.mark.slow
def test_prompt_larger_than_the_context_says_both_numbers(smollm2_path):
    result = run_cli("bench", str(smollm2_path), "-p", "300", "--ctx", "256")
    assert_usage_error(result, "-p 300", "context window of 256 tokens", "--ctx")


@pytest.mark.slow
def test_generation_larger_than_the_context(smollm2_path):
    result = run_cli("bench", str(smollm2_path), "-p", "64", "-n", "300", "--ctx", "256")
    assert_usage_error(result, "-n 300", "context window of 256 tokens")


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_prints_what_was_measured_and_exits_130(smollm2_path):
    child = pexpect.spawn(
        sys.executable, ["-m", "localchat", "bench", str(smollm2_path), "-p", "64", "-n", "4000",
                         "--ctx", "4096", "--repetitions", "1", "--threads", "1", "--json"],
        encoding="utf-8", timeout=120, dimensions=(24, 200),
        env={**os.environ, "TERM": "xterm", "NO_COLOR": "1"})
    child.expect("repetition 1/1")  # the progress display: both loads are done
    child.sendintr()  # inside the prefill or the 4,000-token decode
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130, child.before
    output = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", child.before)
    assert "interrupted: the figures above are what was measured so far" in output
    record = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert record["interrupted"] is True
    # no cold load when the file stays cached (another test process may map it)
    loads = ["cold", "warm"] if record["page_cache"]["method"] == "fadvise" else ["warm"]
    assert [run["cache"] for run in record["runs"] if run["kind"] == "load"] == loads
    assert record["load_s"] > 0 and record["decode_tokens_per_s"] is None


# --- the pieces, in process ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("size", [40, 41, 97, 256])
def test_prompt_of_length_is_exact(engine, size):
    assert engine.count_tokens(bench.prompt_of_length(engine, size)) == size


@pytest.mark.slow
def test_prompt_below_the_template_overhead_is_refused(engine):
    with pytest.raises(bench.UsageError, match="chat template"):
        bench.prompt_of_length(engine, 3)


@pytest.mark.slow
def test_reset_cache_makes_the_next_prompt_evaluate_in_full(engine):
    chat = [{"role": "user", "content": "Say one word."}]
    greedy = Sampling(temperature=0, max_tokens=2, ignore_eos=True)
    for sampling in (greedy, greedy):
        list(engine.stream(chat, sampling))
    assert engine.last_stats.cached_tokens > 0  # the second turn reused the prompt's cache
    engine.reset_cache()
    list(engine.stream(chat, greedy))
    assert engine.last_stats.cached_tokens == 0
    assert engine.last_stats.prefill_tokens == engine.count_tokens(chat)


@pytest.fixture
def stubborn_page_cache(tmp_path, monkeypatch):
    """A file system that ignores fadvise, a process that is root, and a stand-in for
    /proc/sys/vm/drop_caches: the file leaves the cache only once that stand-in is written."""
    drop = tmp_path / "drop_caches"
    drop.write_text("")
    monkeypatch.setattr(bench, "DROP_CACHES", drop)
    monkeypatch.setattr(bench, "resident_fraction", lambda path: 0.0 if drop.read_text() else 1.0)
    monkeypatch.setattr(bench, "mapped_by_others", lambda path: False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return drop


def test_the_machines_page_cache_is_dropped_only_when_asked(stubborn_page_cache, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(4096))
    unasked = bench.drop_file_cache(model)
    assert stubborn_page_cache.read_text() == ""  # the whole machine's cache was left alone
    assert not unasked.dropped and unasked.method == "none"
    assert "not measured" in unasked.note and "--drop-all-caches" in unasked.note
    asked = bench.drop_file_cache(model, drop_all=True)
    assert stubborn_page_cache.read_text() == "1\n"
    assert asked.dropped and asked.method == "drop_caches"


@pytest.mark.slow
def test_a_cold_load_that_cannot_be_cold_is_not_measured(stubborn_page_cache, smollm2_path):
    settings = bench.BenchSettings(prompt_tokens=40, gen_tokens=2, repetitions=1,
                                   bandwidth=False)
    result = bench.run_benchmark(settings, EngineOptions(model_path=smollm2_path, n_ctx=128,
                                                         threads=1))
    assert stubborn_page_cache.read_text() == ""
    record = bench.bench_record(result)
    assert record["load_cold_s"] is None and record["load_s"] > 0
    assert [run["cache"] for run in record["runs"] if run["kind"] == "load"] == ["warm"]
    row = next(row for row in bench.summary_rows(record) if row[0] == "load, cold page cache")
    assert row[1] == "-" and row[2].startswith("not measured") and "--drop-all-caches" in row[2]


def test_memory_bandwidth_is_a_sane_positive_number():
    one = bench.measure_memory_bandwidth(size_mb=32, rounds=2, threads=1)
    two = bench.measure_memory_bandwidth(size_mb=32, rounds=2, threads=2)
    for value in (one, two):
        assert 0.1 < value < 10_000  # GB/s: slower than a disk or faster than any RAM is a bug


def test_resident_fraction_sees_a_file_just_written(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4 * MIB))
    fraction = bench.resident_fraction(path)
    if sys.platform.startswith("linux"):
        assert fraction > 0.9
    else:
        assert fraction is None


def test_peak_rss_covers_what_this_process_touched():
    before = bench.peak_rss_mb()
    block = bytearray(64 * MB)  # zero-filled, so every page is touched
    assert bench.peak_rss_mb() >= before
    assert bench.peak_rss_mb() > 64
    del block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_is_in_decimal_megabytes():
    status = Path("/proc/self/status").read_text()
    kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert bench.peak_rss_mb() == pytest.approx(kib * 1024 / 1_000_000, rel=0.01)


def test_the_table_gives_sizes_as_list_and_show_do(tmp_path):
    """The same file, the same size: 98,362,432 bytes is "98.4 MB" in bench as in list and show."""
    result = bench.BenchResult(
        settings=bench.BenchSettings(64, 8, 1), model_path=tmp_path / "m.gguf",
        model_bytes=98_362_432, weights_read_per_token=90_000_000,
        kv_bytes_per_position=23_040, n_ctx=4096, threads=2, backend="CPU", flash_attn=True,
        decode_prompt_tokens=10, page_cache=None, bandwidth_gb_per_s=None, cache_bytes=None,
        load_average=(0.0, 0.0, 0.0), interrupted=False, measurements=(
            bench.Measurement("load", 0, 0, 0.3, None, cache="warm"),
            bench.Measurement("prefill", 1, 64, 0.1, 640.0, ttft_s=0.12, peak_rss_mb=299.06),
            bench.Measurement("decode", 1, 8, 0.1, 70.0, peak_rss_mb=299.06)))
    record = bench.bench_record(result)
    assert (record["model_size_mb"], record["kv_cache_mb"]) == (98.4, 94.4)  # 94,371,840 bytes
    rows = {figure: (median, note) for figure, median, note in bench.summary_rows(record)}
    assert rows["peak resident memory"] == ("299.1 MB", "model file 98.4 MB + KV cache 94.4 MB")
    assert format_bytes(98_362_432) == "98.4 MB"  # what `list` and `show` print for that file


def test_weights_read_per_token_counts_a_tied_embedding_in_full(tmp_path):
    info = read_model_file(write_tiny_gguf(tmp_path / "tiny.gguf"))
    names = {tensor.name for tensor in info.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied, like SmolLM2
    assert bench.weights_read_per_token(info) == sum(t.nbytes for t in info.tensors)
    embedding = next(t for t in info.tensors if t.name == "token_embd.weight")
    untied = SimpleNamespace(tensors=[*info.tensors, SimpleNamespace(name="output.weight",
                                                                      nbytes=1000)])
    assert bench.weights_read_per_token(untied) == (  # one row of the input embedding: ~nothing
        sum(t.nbytes for t in info.tensors) - embedding.nbytes + 1000)


@pytest.mark.slow
def test_weights_read_per_token_of_the_real_model_is_nearly_the_whole_file(smollm2_path):
    info = read_model_file(smollm2_path)
    assert 0.9 * info.file_size < bench.weights_read_per_token(info) < info.file_size


def test_last_level_cache_is_plausible():
    size = bench.last_level_cache_bytes()
    assert size is None or 64 * 1024 <= size <= 4096 * MB


# --- scripts/bench_native.py parsers, on canned output ---------------------------------------

LLAMA_BENCH_JSON = """[
  {
    "build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor",
    "model_filename": "SmolLM2-135M-Instruct.Q4_1.gguf", "model_type": "llama 135M Q4_1",
    "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
    "n_prompt": 512, "n_gen": 0, "n_depth": 0,
    "test_time": "2025-11-28T11:00:00Z", "avg_ns": 2133333333, "stddev_ns": 1000,
    "avg_ts": 240.012345, "stddev_ts": 1.5,
    "samples_ns": [ 2133333333 ],
    "samples_ts": [ 240.012345 ]
  },
  {
    "build_commit": "0c1e570", "build_number": 1, "n_threads": 2,
    "n_prompt": 0, "n_gen": 128, "n_depth": 0,
    "avg_ns": 1219047619, "stddev_ns": 1000, "avg_ts": 105.0, "stddev_ts": 0.7,
    "samples_ns": [ 1219047619 ],
    "samples_ts": [ 105.0 ]
  }
]
"""

LLAMA_CLI_OUTPUT = """
> Write a long story about a lighthouse keeper who finds a message in a bottle.

Once upon a time, in a small village by the sea, there lived a lighthouse keeper...

[ Prompt: 251.3 t/s | Generation: 90.4 t/s ]

Exiting...
"""

LLAMA_COMPLETION_TIMINGS = """
common_perf_print:    sampling time =      12.01 ms
common_perf_print: prompt eval time =      80.00 ms /    20 tokens (    4.00 ms per token,   250.00 tokens per second)
common_perf_print:        eval time =    2800.00 ms /   255 runs   (   10.98 ms per token,    91.07 tokens per second)
"""  # noqa: E501


def test_llama_bench_json_parser(native):
    assert native.parse_llama_bench_json(LLAMA_BENCH_JSON) == {"pp": 240.012345, "tg": 105.0}
    with_log = "build: 1 (0c1e570)\n" + LLAMA_BENCH_JSON + "\nllama_model_loader: loaded\n"
    assert native.parse_llama_bench_json(with_log)["tg"] == 105.0
    with pytest.raises(ValueError):
        native.parse_llama_bench_json("error: failed to load model")


def test_llama_cli_generation_parser(native):
    assert native.parse_llama_cli_generation(LLAMA_CLI_OUTPUT) == 90.4
    assert native.parse_llama_cli_generation(LLAMA_COMPLETION_TIMINGS) == 91.07
    with pytest.raises(ValueError):
        native.parse_llama_cli_generation("no timings here")


def test_native_rows_print_the_ratio(native):
    rows = [native.Row("decode", 95.0, 100.0), native.Row("prefill", None, 240.0)]
    assert rows[0].ratio == pytest.approx(0.95) and rows[1].ratio is None
    table = native.format_rows(rows).splitlines()
    assert table[1].split()[-3:] == ["95.0", "100.0", "0.950"]
    assert table[2].split()[-3:] == ["-", "240.0", "-"]


def test_native_best_of_rounds_keeps_each_sides_best(native):
    rounds = [[native.Row("decode", 50.0, 100.0)], [native.Row("decode", 90.0, 60.0)],
              [native.Row("decode", None, 80.0)]]
    assert native.best_rows(rounds) == [native.Row("decode", 90.0, 100.0)]
