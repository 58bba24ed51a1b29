"""How `localchat` reads its command line: a lone prompt, and pipes closed early by the reader."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_runner import run_cli


def _write_config(home, text: str) -> None:
    config = home / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.toml").write_text(text, encoding="utf-8")


def test_a_lone_argument_with_a_space_is_the_prompt_for_the_default_model(isolated_home):
    _write_config(isolated_home, 'model = "qwen2.5:0.5b"\n')
    result = run_cli("run", "Why is the sky blue?", "--offline")
    # The configured model was looked for (and is not on disk): the words were not a model name.
    assert result.exit_code == 1, result.stderr
    assert "qwen2.5:0.5b is not on disk" in result.stderr
    assert "not a valid model name" not in result.stderr


def test_a_lone_word_that_names_no_model_says_how_to_ask_the_default_model():
    result = run_cli("run", "hello", "--offline")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "unknown model 'hello'" in result.stderr
    assert 'localchat run smollm2 "hello"' in result.stderr


@pytest.mark.slow
def test_the_configured_model_answers_a_lone_prompt(isolated_home, smollm2_path):
    _write_config(isolated_home, f'model = "{smollm2_path}"\n')
    result = run_cli("run", "Name a colour.", "--temperature", "0", "--max-tokens", "4")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("args", ["--help", "run --help", "history --help", "list"])
def test_a_reader_that_leaves_early_is_not_an_error(args):
    # `set -o pipefail` scripts fail on any non-zero status in a pipeline.
    pipeline = subprocess.run(
        f'set -o pipefail; "{sys.executable}" -m localchat {args} | head -c 1 >/dev/null',
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert pipeline.returncode == 0, pipeline.stderr
    assert "Traceback" not in pipeline.stderr
