"""--cache-type: the KV cache's type, its real size, its need of flash attention, snapshots."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli

from localchat.engine.local import LocalEngine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.errors import UsageError
from localchat.history.records import open_history
from localchat.history.snapshots import restore_snapshot, save_snapshot
from localchat.models.gguf_reader import estimate_memory, read_model_file

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_quantized_cache_needs_flash_attention(tmp_path):
    options = EngineOptions(model_path=tmp_path / "m.gguf", cache_type="q8_0", flash_attn=False)
    with pytest.raises(UsageError, match="needs flash attention"):
        options.validate()
    EngineOptions(model_path=tmp_path / "m.gguf", cache_type="f16", flash_attn=False).validate()
    # The CLI says so before llama.cpp (or a download) gets to it.
    (tmp_path / "m.gguf").write_bytes(b"not a model")
    result = run_cli("run", str(tmp_path / "m.gguf"), "hi", "--cache-type", "q4_0",
                     "--no-flash-attn")
    assert result.exit_code == 2 and "q4_0 KV cache needs flash attention" in result.stderr


@pytest.mark.slow
def test_the_memory_estimate_sizes_the_cache_by_its_type(smollm2_path):
    info = read_model_file(smollm2_path)
    f16 = estimate_memory(info, 4096).kv_cache_bytes
    # 30 layers x 3 KV heads x 64 values, for K and V: a row of 192 is 6 blocks of 32
    assert f16 == 2 * 30 * 4096 * 192 * 2
    assert estimate_memory(info, 4096, "q8_0").kv_cache_bytes == 2 * 30 * 4096 * 6 * 34
    assert estimate_memory(info, 4096, "q4_0").kv_cache_bytes == 2 * 30 * 4096 * 6 * 18
    result = run_cli("show", str(smollm2_path), "--cache-type", "q8_0", "--json")
    memory = json.loads(result.stdout)["memory"]
    assert memory["kv_cache_type"] == "q8_0"
    assert memory["kv_cache_bytes"] == estimate_memory(info, memory["n_ctx"], "q8_0").kv_cache_bytes
    assert run_cli("show", str(smollm2_path), "--cache-type", "q5_1").exit_code == 2


def load(path, cache_type: str) -> LocalEngine:
    return LocalEngine(EngineOptions(model_path=path, n_ctx=512, threads=1,
                                     cache_type=cache_type), read_model_file(path))


@pytest.mark.slow
def test_a_quantized_cache_is_smaller_in_llama_cpp_itself_and_a_snapshot_keeps_to_its_type(
        smollm2_path):
    f16, q8 = load(smollm2_path, "f16"), load(smollm2_path, "q8_0")
    try:
        for engine in (f16, q8):  # one token: the cache then holds just the prompt, in both
            assert "".join(engine.stream(HELLO, Sampling(temperature=0, max_tokens=1)))
        # llama.cpp's own serialized cache of the same tokens: K and V rows at 34/64 the size
        f16_tokens, f16_state = f16.export_state()
        q8_tokens, q8_state = q8.export_state()
        assert f16_tokens == q8_tokens
        assert 0.5 < len(q8_state) / len(f16_state) <= 0.55
        assert q8.info.cache_type == "q8_0"
        assert q8.info.kv_cache_bytes / f16.info.kv_cache_bytes == pytest.approx(34 / 64)
        with open_history() as store:
            conversation = store.create_conversation("smollm2")
            store.add_message(conversation.id, "user", HELLO[0]["content"])
            saved = save_snapshot(q8, store, conversation.id)
            assert saved.path is not None, saved.note
            outcome = restore_snapshot(f16, store, conversation.id, HELLO)
            assert not outcome.restored
            assert "q8_0 KV cache" in outcome.note and "--cache-type f16" in outcome.note
            assert f16._llama.n_tokens == len(f16_tokens)  # untouched by the refused file
            assert restore_snapshot(q8, store, conversation.id, HELLO).restored
    finally:
        f16.close()
        q8.close()
