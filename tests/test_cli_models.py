"""`localchat pull / list / show / rm`, and `run` pulling a missing model, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pexpect
import pytest
from hub_server import HubServer

from localchat import paths

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CATALOG = f"""
[tiny]
description = "the test model, served by the local hub"
default_tag = "q4_1"
temperature = 0.0
[tiny.tags.q4_1]
parameters = "135M"
quant = "Q4_1"
repo = "{REPO}"
file = "{FILE}"
sha256 = "{SHA}"
size = 98362432
"""


def localchat(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localchat", *args], input=stdin,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def hub(smollm2_path, monkeypatch):
    """A local hub serving the real model; the test catalog points `tiny` at it."""
    catalog = paths.user_catalog_file()
    catalog.parent.mkdir(parents=True, exist_ok=True)
    catalog.write_text(CATALOG)
    server = HubServer().start()
    server.add_file(REPO, FILE, smollm2_path)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.close()


@pytest.mark.slow
def test_pull_list_show_rm_round_trip(hub):
    pulled = localchat("pull", "tiny")
    assert pulled.returncode == 0, pulled.stderr
    assert "\x1b" not in pulled.stderr  # no progress bar in a pipe
    assert "tiny:q4_1 is at" in pulled.stderr

    again = localchat("pull", "tiny")
    assert "already" in again.stderr
    assert len(hub.file_downloads()) == 1  # the second pull made no download

    listed = json.loads(localchat("list", "--json").stdout)["models"]
    assert [m["name"] for m in listed] == ["tiny:q4_1"]
    assert listed[0]["context_length"] == 8192 and listed[0]["quant"] == "Q4_1"
    table = localchat("list").stdout
    assert "tiny:q4_1" in table and "98.4 MB" in table

    shown = localchat("show", "tiny", "--ctx", "2048").stdout
    assert "architecture     llama" in shown
    assert "at ctx 2,048" in shown and "KV cache" in shown
    assert "<|im_start|>" in shown  # the chat template

    removed = localchat("rm", "tiny")
    assert removed.returncode == 0 and "freed" in removed.stderr
    assert json.loads(localchat("list", "--json").stdout)["models"] == []


@pytest.mark.slow
def test_run_pulls_a_missing_model_then_runs_offline(hub):
    first = localchat("run", "tiny", "hi", "--max-tokens", "8", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["model"] == "tiny:q4_1"
    hub.close()  # the hub is gone: a model on disk needs no network
    second = localchat("run", "tiny", "hi", "--max-tokens", "8", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(first.stdout)["text"] == json.loads(second.stdout)["text"]  # catalog temp 0


def test_offline_with_the_model_missing(hub):
    result = localchat("run", "tiny", "hi", "--offline")
    one_line_error(result, 1, "not on disk", "offline")
    assert hub.requests == []


def test_bad_names_are_usage_errors():
    one_line_error(localchat("pull", "../../etc/passwd"), 2)
    one_line_error(localchat("pull", "/abs/model.gguf"), 2, "path")
    one_line_error(localchat("pull", "smollm2;rm -rf ~"), 2)
    one_line_error(localchat("run", "smollm", "hi"), 2, "smollm2")  # closest name suggested
    one_line_error(localchat("pull", "smollm2:q9_9"), 2, "q4_1")  # known tags listed


def test_show_and_rm_of_a_model_not_on_disk():
    one_line_error(localchat("show", "smollm2"), 1, "not on disk", "localchat pull smollm2")
    assert localchat("rm", "smollm2").returncode == 1


def test_show_a_local_file(smollm2_path):
    shown = localchat("show", str(smollm2_path))
    assert shown.returncode == 0
    assert "trained context  8,192" in shown.stdout and "fits" in shown.stdout


def test_show_warns_about_a_ctx_past_the_trained_length(smollm2_path):
    beyond = localchat("show", str(smollm2_path), "--ctx", "16384")
    assert beyond.returncode == 0 and "at ctx 16,384" in beyond.stdout
    assert beyond.stderr.startswith("warning: --ctx 16384 is beyond this model's trained length "
                                    "(8192)")
    assert localchat("show", str(smollm2_path), "--ctx", "8192").stderr == ""


def test_show_json_is_one_object_with_the_metadata_memory_and_template(smollm2_path):
    shown = localchat("show", str(smollm2_path), "--json", "--ctx", "2048")
    assert shown.returncode == 0, shown.stderr
    [line] = shown.stdout.splitlines()
    record = json.loads(line)
    assert record["architecture"] == "llama" and record["context_length"] == 8192
    assert record["parameters"] > 100_000_000 and record["quantization"] == "Q4_1"
    assert record["path"] == str(smollm2_path) and record["file_size"] > 0
    memory = record["memory"]
    assert memory["n_ctx"] == 2048 and memory["kv_cache_bytes"] > 0
    assert memory["total_bytes"] == memory["weights_bytes"] + memory["kv_cache_bytes"]
    assert "<|im_start|>" in record["chat_template"]


def test_list_with_nothing_on_disk():
    result = localchat("list")
    assert result.returncode == 0 and "no models on disk" in result.stderr
    assert json.loads(localchat("list", "--json").stdout) == {"models": []}



def at_a_terminal(*args: str, **env: str) -> tuple[int | None, str]:
    """`localchat ARGS` in a pseudo-terminal (plain, no colour); its status and output.

    A question (`Download it now?`) counts as the end: a person would have to answer it.
    """
    child = pexpect.spawn(sys.executable, ["-m", "localchat", *args],
                          env={**os.environ, "TERM": "xterm", "NO_COLOR": "1", **env},
                          dimensions=(24, 100), encoding="utf-8", timeout=60)
    asked = child.expect([r"Download it now\?", pexpect.EOF]) == 0
    output = child.before + ("Download it now?" if asked else "")
    child.close(force=True)
    return (None if asked else child.exitstatus), output


def test_hf_hub_offline_at_a_terminal_asks_nothing_and_draws_no_bar():
    """HF_HUB_OFFLINE=1 counts like --offline: a one-line error, not a question and a 0/? bar."""
    expected = ["error: smollm2:q4_1 is not on disk, and offline mode is on (go online and "
                "`localchat pull smollm2:q4_1`, or unset HF_HUB_OFFLINE)"]
    for command in (["run", "smollm2", "hi"], ["pull", "smollm2"]):
        status, output = at_a_terminal(*command, HF_HUB_OFFLINE="1")
        assert status == 1, output
        assert [line for line in output.splitlines() if line.strip()] == expected, output
