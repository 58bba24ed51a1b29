"""`localchat pull / list / show / rm`, and `run` pulling a missing model, run in-process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys

import pexpect
import pytest
from cli_runner import CliResult, run_cli
from gguf_factory import TINY_TEMPLATE, write_tiny_gguf
from hub_server import HubServer, go_online

from localchat import cli, paths
from localchat.render import Environment

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432
CATALOG = """
[tiny]
description = "the test model, served by the local hub"
default_tag = "q4_1"
temperature = 0.0
[tiny.tags.q4_1]
parameters = "135M"
quant = "Q4_1"
repo = "{repo}"
file = "{file}"
sha256 = "{sha}"
size = {size}
"""


def one_line_error(result: CliResult, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def serve(monkeypatch, content, sha: str, size: int) -> HubServer:
    """A local hub serving `content` as the test repo's file; the test catalog's `tiny` is it."""
    catalog = paths.user_catalog_file()
    catalog.parent.mkdir(parents=True, exist_ok=True)
    catalog.write_text(CATALOG.format(repo=REPO, file=FILE, sha=sha, size=size))
    server = HubServer().start()
    server.add_file(REPO, FILE, content)
    go_online(monkeypatch, server.endpoint)
    return server


@pytest.fixture
def hub(smollm2_path, monkeypatch):
    """A local hub serving the real model."""
    server = serve(monkeypatch, smollm2_path, SHA, SIZE)
    yield server
    server.close()


@pytest.fixture
def empty_hub(monkeypatch):
    """A local hub whose file no test downloads: a few bytes stand in for the model."""
    content = b"GGUF never downloaded"
    server = serve(monkeypatch, content, hashlib.sha256(content).hexdigest(), len(content))
    yield server
    server.close()


@pytest.mark.slow
def test_pull_list_show_rm_round_trip(hub):
    pulled = run_cli("pull", "tiny")
    assert pulled.exit_code == 0, pulled.stderr
    assert "\x1b" not in pulled.stderr  # no progress bar in a pipe
    assert "tiny:q4_1 is at" in pulled.stderr

    again = run_cli("pull", "tiny")
    assert "already" in again.stderr
    assert len(hub.file_downloads()) == 1  # the second pull made no download

    listed = json.loads(run_cli("list", "--json").stdout)["models"]
    assert [m["name"] for m in listed] == ["tiny:q4_1"]
    assert listed[0]["context_length"] == 8192 and listed[0]["quant"] == "Q4_1"
    table = run_cli("list").stdout
    assert "tiny:q4_1" in table and "98.4 MB" in table

    shown = run_cli("show", "tiny", "--ctx", "2048").stdout
    assert "architecture     llama" in shown and "file size        98.4 MB" in shown
    assert "at ctx 2,048" in shown and "KV cache" in shown
    assert "<|im_start|>" in shown  # the chat template

    removed = run_cli("rm", "tiny")
    assert removed.exit_code == 0 and "(98.4 MB freed)" in removed.stderr
    assert json.loads(run_cli("list", "--json").stdout)["models"] == []


@pytest.mark.slow
def test_run_pulls_a_missing_model_then_runs_offline(hub):
    first = run_cli("run", "tiny", "hi", "--max-tokens", "8", "--threads", "1", "--json")
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["model"] == "tiny:q4_1"
    hub.close()  # the hub is gone: a model on disk needs no network
    second = run_cli("run", "tiny", "hi", "--max-tokens", "8", "--threads", "1", "--json")
    assert second.exit_code == 0, second.stderr
    assert json.loads(first.stdout)["text"] == json.loads(second.stdout)["text"]  # catalog temp 0


def test_offline_with_the_model_missing(empty_hub):
    result = run_cli("run", "tiny", "hi", "--offline")
    one_line_error(result, 1, "not on disk", "offline")
    assert empty_hub.requests == []


class Keyboard(io.StringIO):
    """Typed answers on a terminal: stdin that says it is a tty."""

    def isatty(self) -> bool:
        return True


def test_at_a_terminal_run_asks_before_pulling_and_no_means_no_download(empty_hub, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    env = Environment(stdin=Keyboard("maybe\nn\n"), stdout=io.StringIO(), stderr=Keyboard())
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "tiny", "hi"], env)
    assert exited.value.code == 1
    question = "tiny:q4_1 is not on disk. Download it now? [Y/n]: "
    assert env.stderr.getvalue() == question * 2 + (  # asked again after an answer it cannot use
        "error: tiny:q4_1 is not on disk and was not downloaded (`localchat pull tiny:q4_1` "
        "fetches it)\n")
    assert empty_hub.requests == [] and env.stdout.getvalue() == ""
    ended = Environment(stdin=Keyboard(""), stdout=io.StringIO(), stderr=Keyboard())
    with pytest.raises(SystemExit) as exited:  # Ctrl-D at the question: an interrupt
        cli.main(["run", "tiny", "hi"], ended)
    assert exited.value.code == 130 and empty_hub.requests == []


def test_a_mirror_with_a_malformed_answer_is_one_line_naming_it(empty_hub):
    empty_hub.add_file("test-org/Other-GGUF", "Other-Q4_K_M.gguf", b"GGUF other")
    empty_hub.malformed = "lfs-fields"  # what a broken HF_ENDPOINT mirror might send
    result = run_cli("pull", "test-org/Other-GGUF:Q4_K_M")  # not in the catalog: model info
    one_line_error(result, 1, f"{empty_hub.endpoint} sent a malformed answer for "
                   "test-org/Other-GGUF", "'pointerSize'", "HF_ENDPOINT")
    assert empty_hub.file_downloads() == []


def test_bad_names_are_usage_errors():
    one_line_error(run_cli("pull", "../../etc/passwd"), 2)
    one_line_error(run_cli("pull", "/abs/model.gguf"), 2, "path")
    one_line_error(run_cli("pull", "smollm2;rm -rf ~"), 2)
    one_line_error(run_cli("run", "smollm", "hi"), 2, "smollm2")  # closest name suggested
    one_line_error(run_cli("pull", "smollm2:q9_9"), 2, "q4_1")  # known tags listed


def test_show_and_rm_of_a_model_not_on_disk():
    one_line_error(run_cli("show", "smollm2"), 1, "not on disk", "localchat pull smollm2")
    assert run_cli("rm", "smollm2").exit_code == 1


def test_show_a_local_file(tmp_path):
    shown = run_cli("show", str(write_tiny_gguf(tmp_path / "tiny.gguf")))
    assert shown.exit_code == 0, shown.stderr
    assert "trained context  128" in shown.stdout and "fits" in shown.stdout
    assert "chat template:\n{% for m in messages %}" in shown.stdout


def test_show_warns_about_a_ctx_past_the_trained_length(tmp_path):
    tiny = str(write_tiny_gguf(tmp_path / "tiny.gguf"))  # trained for 128 tokens
    beyond = run_cli("show", tiny, "--ctx", "256")
    assert beyond.exit_code == 0 and "at ctx 256" in beyond.stdout
    assert beyond.stderr.startswith("warning: --ctx 256 is beyond this model's trained length "
                                    "(128)")
    assert run_cli("show", tiny, "--ctx", "128").stderr == ""


def test_show_json_is_one_object_with_the_metadata_memory_and_template(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    shown = run_cli("show", str(tiny), "--json", "--ctx", "64")
    assert shown.exit_code == 0, shown.stderr
    [line] = shown.stdout.splitlines()
    record = json.loads(line)
    assert record["architecture"] == "llama" and record["context_length"] == 128
    assert record["parameters"] > 0 and record["quantization"] == "Q4_1"
    assert record["path"] == str(tiny) and record["file_size"] == tiny.stat().st_size
    memory = record["memory"]
    assert memory["n_ctx"] == 64 and memory["kv_cache_bytes"] > 0
    assert memory["total_bytes"] == memory["weights_bytes"] + memory["kv_cache_bytes"]
    assert record["chat_template"] == TINY_TEMPLATE


def test_list_with_nothing_on_disk():
    result = run_cli("list")
    assert result.exit_code == 0 and "no models on disk" in result.stderr
    assert json.loads(run_cli("list", "--json").stdout) == {"models": []}


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
