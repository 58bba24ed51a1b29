"""`localchat run` end to end: output, pipes, errors; the real model where a reply is needed.

The command runs in-process (`run_cli`); a few tests keep a real process for what only one shows:
signals, a pipe closed by its reader, llama.cpp writing to the stderr file descriptor, the
interpreter's imports and the console script.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import CliResult, run_cli
from gguf_factory import write_tiny_gguf

from localchat import cli
from localchat.engine.runtime import compiled_backend
from localchat.errors import ModelFileError
from localchat.render import Environment

# Greedy and short: a tiny model may ramble, and each test should take a few seconds. One thread:
# on a CPU busy with other tests, llama.cpp's threads wait for each other at every op.
GREEDY = ["--temperature", "0", "--max-tokens", "48", "--threads", "1"]
BACKENDS = {"CPU", "CUDA", "Metal", "Vulkan", "ROCm", "SYCL"}  # what compiled_backend() names


def localchat(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m localchat ARGS` in a real process, for what in-process runs cannot show."""
    return subprocess.run([sys.executable, "-m", "localchat", *args], input="",
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: CliResult, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A valid GGUF header that llama.cpp cannot load: flags are checked before loading."""
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def write_config(isolated_home: Path, text: str) -> None:
    config_dir = isolated_home / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.toml").write_text(text)


# --- replies from the real model ----------------------------------------------------------


@pytest.mark.slow
def test_same_prompt_twice_gives_the_same_text(smollm2_path):
    first = run_cli("run", str(smollm2_path), "Name three primary colours.", *GREEDY)
    second = run_cli("run", str(smollm2_path), "Name three primary colours.", *GREEDY)
    assert first.stdout.strip()
    assert first.exit_code == 0, first.stderr
    assert first.stdout == second.stdout
    assert "red" in first.stdout.lower()
    assert first.stdout.endswith("\n")


@pytest.mark.slow
def test_flash_attention_is_on_by_default_and_can_be_turned_off(smollm2_path):
    on = json.loads(run_cli("run", str(smollm2_path), "hi", "--json", *GREEDY).stdout)
    off = run_cli("run", str(smollm2_path), "hi", "--json", "--no-flash-attn", *GREEDY)
    assert off.exit_code == 0, off.stderr
    assert (on["flash_attn"], json.loads(off.stdout)["flash_attn"]) == (True, False)
    assert json.loads(off.stdout)["text"].strip()


@pytest.mark.slow
def test_json_is_one_object_whose_counts_match(smollm2_path):
    result = run_cli("run", str(smollm2_path), "hi", "--json", *GREEDY)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    for key in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "load_s",
                "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in record
    assert record["finish_reason"] == "stop"
    assert record["text"].strip()
    assert record["completion_tokens"] >= len(record["text"].split())  # words >= 1 token each
    assert record["prompt_tokens"] > 0 and record["load_s"] > 0 and record["ttft_s"] > 0
    assert record["backend"] == compiled_backend() and record["backend"] in BACKENDS
    assert record["tokens_estimated"] is False  # counted by llama.cpp


@pytest.mark.slow
def test_json_counts_every_generated_token(smollm2_path):
    result = run_cli("run", str(smollm2_path), "hi", "--json", "--ignore-eos",
                     "--max-tokens", "40", "--temperature", "0", "--threads", "1")
    record = json.loads(result.stdout)
    assert record["completion_tokens"] == 40
    assert record["finish_reason"] == "length"
    assert record["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_piped_input_reaches_the_model_before_the_prompt(smollm2_path):
    alone = json.loads(run_cli("run", str(smollm2_path), "Translate to French:", "--json",
                               *GREEDY).stdout)
    piped = json.loads(run_cli("run", str(smollm2_path), "Translate to French:", "--json",
                               *GREEDY, stdin="The cat sat on the mat.\n").stdout)
    assert piped["prompt_tokens"] > alone["prompt_tokens"]
    assert "cat" in piped["text"].lower()  # the model talks about the piped sentence


@pytest.mark.slow
def test_stdin_alone_is_the_prompt(smollm2_path):
    result = run_cli("run", str(smollm2_path), *GREEDY, stdin="Name three primary colours.")
    assert result.exit_code == 0, result.stderr
    assert "red" in result.stdout.lower()


@pytest.mark.slow
def test_pipe_output_has_no_escape_codes(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Write a markdown list of two fruits.",
                     "--verbose", *GREEDY)
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "\x1b" not in result.stderr


@pytest.mark.slow
def test_verbose_prints_honest_stats_on_stderr(smollm2_path):
    result = run_cli("run", str(smollm2_path), "hi", "--verbose", *GREEDY)
    assert result.exit_code == 0
    stats = result.stderr.strip().splitlines()
    summary = next(line for line in stats if line.startswith("load "))
    for part in ("first token", "prefill", "decode", "tok/s", "finish stop"):
        assert part in summary
    assert "Hello" in result.stdout and "load " not in result.stdout


@pytest.mark.slow
def test_llama_logs_hidden_without_verbose(smollm2_path):
    # A real process: llama.cpp could write to file descriptor 2 behind Python's back.
    result = localchat("run", str(smollm2_path), "hi", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.slow
def test_system_prompt_flag(smollm2_path):
    plain = json.loads(run_cli("run", str(smollm2_path), "hi", "--json", *GREEDY).stdout)
    pirate = json.loads(run_cli("run", str(smollm2_path), "hi", "--json", *GREEDY,
                                "--system", "You are a pirate. Always talk like a pirate, "
                                "with arr and matey in every sentence.").stdout)
    assert pirate["prompt_tokens"] != plain["prompt_tokens"]
    assert pirate["text"] != plain["text"]


@pytest.mark.slow
def test_stop_reads_escapes_so_the_readme_example_stops_at_a_blank_line(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Name three primary colours.", *GREEDY,
                     "--stop", r"\n\n", "--json")
    record = json.loads(result.stdout)
    assert record["finish_reason"] == "stop", record
    assert record["text"] and "\n\n" not in record["text"]


@pytest.mark.slow
def test_config_file_sets_defaults_and_flags_override(smollm2_path, isolated_home):
    write_config(isolated_home, "temperature = 0.0\nmax_tokens = 5\nctx = 512\nthreads = 1\n")
    capped = json.loads(run_cli("run", str(smollm2_path), "Tell me a story.", "--json",
                                "--ignore-eos").stdout)
    assert capped["completion_tokens"] == 5 and capped["n_ctx"] == 512
    overridden = json.loads(run_cli("run", str(smollm2_path), "Tell me a story.", "--json",
                                    "--ignore-eos", "--max-tokens", "9").stdout)
    assert overridden["completion_tokens"] == 9


@pytest.mark.slow
def test_prompt_longer_than_the_context(smollm2_path):
    result = run_cli("run", str(smollm2_path), "word " * 400, "--ctx", "128")
    assert_one_line_error(result, 1, "context window is 128", "--ctx")
    assert result.stdout == ""


@pytest.mark.slow
def test_a_reply_cut_by_the_full_window_says_context_not_length(smollm2_path):
    result = run_cli("run", str(smollm2_path), "Tell me a story.", "--ctx", "64",
                     "--ignore-eos", "--temperature", "0", "--threads", "1", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["finish_reason"] == "context"
    assert record["prompt_tokens"] + record["completion_tokens"] == 64  # never above the window
    note = result.stderr.strip()
    assert note.startswith("note: the reply stopped at the end of the 64-token context window")
    assert "raise --ctx" in note


@pytest.mark.slow
def test_ctx_past_the_trained_length_warns_and_the_hint_asks_for_no_more(smollm2_path):
    result = run_cli("run", str(smollm2_path), "--ctx", "8200", "--threads", "1",
                     stdin="word " * 8300)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("warning: --ctx 8200 is beyond this model's trained length (8192)")
    assert error.startswith("error: the prompt is") and "context window is 8200" in error
    assert "already past this model's trained length (8192)" in error
    assert "raise --ctx" not in error


@pytest.mark.slow
def test_truncated_model(tmp_path, smollm2_path):
    truncated = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    assert_one_line_error(run_cli("run", str(truncated), "hi"), 1, "truncated")


# --- bad input: each a one-line error, the right exit code, no traceback -----------------


def test_broken_config_names_file_and_line(tiny, isolated_home):
    write_config(isolated_home, "ctx = 512\ntemperature = = 0\n")
    assert_one_line_error(run_cli("run", str(tiny), "hi"), 1, "config.toml", "line 2")


def test_config_with_unknown_key_or_wrong_type(tiny, isolated_home):
    write_config(isolated_home, "ctx = 512\ntemprature = 0.5\n")
    assert_one_line_error(run_cli("run", str(tiny), "hi"), 1, "line 2", "temprature")
    write_config(isolated_home, 'threads = "many"\n')
    assert_one_line_error(run_cli("run", str(tiny), "hi"), 1, "threads", "int")


def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path / "nope.gguf"), "hi"), 1, "nope.gguf")


def test_directory_instead_of_file(tmp_path):
    folder = tmp_path / "models.gguf"
    folder.mkdir()
    assert_one_line_error(run_cli("run", str(folder), "hi"), 1, "directory")


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("run", str(empty), "hi"), 1, "empty")


def test_text_file_renamed_gguf(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("These are my notes, not a model.\n" * 20)
    assert_one_line_error(run_cli("run", str(fake), "hi"), 1, "not a GGUF file")


def test_a_file_llama_cpp_cannot_load(tiny):
    assert_one_line_error(run_cli("run", str(tiny), "hi", "--max-tokens", "2"), 1,
                          "llama.cpp could not load", "--verbose")


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "-1", "--temperature"),
    ("--top-p", "2", "--top-p"),
    ("--ctx", "0", "--ctx"),
    ("--threads", "0", "--threads"),
    ("--ctx", "abc", "--ctx"),
])
def test_bad_flag_values_are_usage_errors(tiny, flag, value, needle):
    assert_one_line_error(run_cli("run", str(tiny), "hi", flag, value), 2, needle)


def test_unknown_chat_format(tiny):
    result = run_cli("run", str(tiny), "hi", "--chat-format", "klingon")
    assert_one_line_error(result, 2, "klingon", "chatml")


def test_empty_prompt_is_a_usage_error(tiny):
    assert_one_line_error(run_cli("run", str(tiny), "   ", stdin=""), 2, "empty")


def test_debug_lets_the_error_through_with_its_traceback(tmp_path):
    with pytest.raises(ModelFileError, match="nope.gguf"):
        run_cli("--debug", "run", str(tmp_path / "nope.gguf"), "hi")


def test_an_unexpected_exception_is_one_line_and_exit_1(monkeypatch):
    from localchat.models import store

    def broken(*args, **kwargs):
        raise KeyError("pointerSize")

    monkeypatch.setattr(store, "list_local_models", broken)
    result = run_cli("list")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == ("error: unexpected KeyError: 'pointerSize' (a bug: run with --debug "
                             "for the traceback)\n")
    with pytest.raises(KeyError):  # --debug (or LOCALCHAT_DEBUG) lets it through, traceback and all
        run_cli("--debug", "list")
    with pytest.raises(KeyError):
        run_cli("list", env={"LOCALCHAT_DEBUG": "1"})


def test_commands_write_only_to_the_environment_they_are_given(tmp_path):
    """Output goes to the Environment's streams, never to sys.stdout or sys.stderr directly."""
    for argv in (["--version"], ["list"], ["history"], ["run", str(tmp_path / "nope.gguf"), "hi"],
                 ["show", str(write_tiny_gguf(tmp_path / "tiny.gguf"))], ["run", "smollm"]):
        env = Environment(stdin=io.StringIO(""), stdout=io.StringIO(), stderr=io.StringIO())
        stray_out, stray_err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stray_out), contextlib.redirect_stderr(stray_err), \
                pytest.raises(SystemExit):
            cli.main(argv, env)
        assert env.stdout.getvalue() + env.stderr.getvalue(), argv
        assert (stray_out.getvalue(), stray_err.getvalue()) == ("", ""), argv


# --- what only a real process shows -------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_generation_cleanly(smollm2_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "localchat", "run", str(smollm2_path), "Tell me a story.",
         "--ignore-eos", "--max-tokens", "4000", "--temperature", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first = process.stdout.read(20)  # wait until text streams
    assert first
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "finish interrupted" in err  # the partial reply's stats say it was cut


@pytest.mark.slow
def test_broken_pipe_exits_quietly(smollm2_path):
    pipeline = subprocess.run(
        f'"{sys.executable}" -m localchat run "{smollm2_path}" "Tell me a story." '
        f"--ignore-eos --max-tokens 400 --temperature 0 | head -c 5; "
        "echo; echo status=${PIPESTATUS[0]}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )
    assert pipeline.stdout.strip().endswith("status=0")
    assert pipeline.stderr == ""


def test_help_does_not_import_heavy_libraries():
    probe = (
        "import sys\n"
        "from localchat.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('llama_cpp', 'huggingface_hub', 'numpy', 'gguf')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)
    assert "HEAVY=\n" in result.stdout, result.stdout


def test_the_console_script_runs_and_names_the_backend():
    script = shutil.which("localchat", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("localchat is not installed in this interpreter's environment")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "localchat 0.1.0"
    assert lines[1].startswith("llama-cpp-python 0.3.36 (llama.cpp backend: ")
    assert lines[1].removeprefix("llama-cpp-python 0.3.36 (llama.cpp backend: ")[:-1] in BACKENDS


def test_version_names_the_compiled_backend():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout == ("localchat 0.1.0\nllama-cpp-python 0.3.36 "
                             f"(llama.cpp backend: {compiled_backend()})\n")
