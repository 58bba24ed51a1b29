"""`snapshot_cap_mb` in config.toml caps the chat's KV-cache snapshots: no model needed.

The chat saves a snapshot when a conversation ends; an engine that can export a state stands in
for llama.cpp (the snapshot format and its checks are tested with the real model elsewhere).
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_runner import run_cli
from gguf_factory import write_tiny_gguf

from localchat import cli, paths
from localchat.chat.session import ChatSession, ReplOptions
from localchat.engine.protocol import Sampling
from localchat.history import snapshots
from localchat.history.records import open_history
from localchat.oneshot import Request
from localchat.render import Environment

STATE = bytes(range(256)) * 1000  # 256,000 bytes of "KV cache" per snapshot


class StateEngine:
    """Just enough of an engine for a chat to end and save its snapshot."""

    def __init__(self, model_path: Path) -> None:
        self.info = SimpleNamespace(model_path=model_path, flash_attn=True)
        self.n_ctx = 512
        self.last_stats = None

    def export_state(self) -> tuple[list[int], bytes]:
        return list(range(40)), STATE

    def import_state(self, tokens: list[int], state: bytes) -> None:
        raise AssertionError("not resumed in these tests")

    def count_tokens(self, messages) -> int:
        return 0

    def close(self) -> None:
        pass


def end_a_conversation(store, engine, options: ReplOptions) -> Path:
    request = Request(model="tiny", prompt=None, system=None, sampling=Sampling(), engine=None,
                      verbose=True)
    env = Environment(stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    chat = ChatSession(request, env, options, store, engine)
    chat.record = store.create_conversation("tiny", None)
    chat.cache_is_current = True
    chat.end_conversation()
    assert "saved a snapshot" in env.stderr.getvalue(), env.stderr.getvalue()
    return next(snapshots.snapshot_dir().glob(f"*conversation-{chat.record.id}-*.kvsnap"))


def test_the_chat_saves_under_the_cap_it_is_given_and_evicts_the_oldest(tmp_path):
    engine = StateEngine(write_tiny_gguf(tmp_path / "tiny.gguf"))
    with open_history() as store:
        first = end_a_conversation(store, engine, ReplOptions(snapshot_cap_bytes=10_000_000))
        size = first.stat().st_size
        assert size > len(STATE)
        second = end_a_conversation(store, engine, ReplOptions(snapshot_cap_bytes=size * 3 // 2))
    assert second.exists() and not first.exists()  # two no longer fit: the older one went


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("config", "cap"), [("snapshot_cap_mb = 3\n", 3_000_000),
                                             ("snapshot_cap_mb = 0\n", 0),
                                             ("", snapshots.DEFAULT_CAP_BYTES)])
def test_config_snapshot_cap_mb_reaches_the_chat_in_megabytes(tmp_path, monkeypatch, config, cap):
    paths.config_dir().mkdir(parents=True)
    paths.config_file().write_text(config)
    given = []
    monkeypatch.setattr("localchat.chat.repl.run_repl",
                        lambda request, env, options: given.append(options) or 0)
    env = Environment(stdin=Terminal(), stdout=Terminal(), stderr=Terminal())
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", str(write_tiny_gguf(tmp_path / "tiny.gguf"))], env)  # a chat: no prompt
    assert exited.value.code == 0
    assert [options.snapshot_cap_bytes for options in given] == [cap]


@pytest.mark.parametrize("value", ["-1", "-2000", "1.5", '"2GB"', "true"])
def test_a_snapshot_cap_below_zero_or_not_a_whole_number_names_the_line(tmp_path, value):
    paths.config_dir().mkdir(parents=True)
    paths.config_file().write_text(f'model = "smollm2"\nsnapshot_cap_mb = {value}\n')
    result = run_cli("run", str(write_tiny_gguf(tmp_path / "tiny.gguf")), "hi")
    assert result.exit_code == 1, result.stderr
    assert "config.toml, line 2: snapshot_cap_mb must be " in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2 and "Traceback" not in result.stderr
