"""How run, serve and bench merge settings: flag, then config.toml, then catalog, then built-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.errors import UsageError
from localchat.settings import merge

MODEL = Path("model.gguf")


def test_built_in_defaults_when_nothing_is_set():
    options = EngineOptions.from_settings(merge({}, {}, {}), MODEL)
    assert (options.n_ctx, options.threads, options.use_mmap, options.flash_attn) == (
        None, None, True, True)
    assert not options.cpu_only and not options.use_mlock and not options.verbose
    assert Sampling.from_settings(merge({}, {}, {})) == Sampling()


def test_a_flag_beats_the_config_which_beats_the_catalog():
    config = {"ctx": 2048, "flash_attn": False, "mmap": False, "threads": 3}
    catalog = {"ctx": 8192, "temperature": 0.2}
    assert EngineOptions.from_settings(merge({}, config, catalog), MODEL).n_ctx == 2048
    assert EngineOptions.from_settings(merge({}, {}, catalog), MODEL).n_ctx == 8192
    from_config = EngineOptions.from_settings(merge({}, config, catalog), MODEL)
    assert (from_config.flash_attn, from_config.use_mmap, from_config.threads) == (False, False, 3)
    flagged = EngineOptions.from_settings(
        merge({"ctx": 512, "flash_attn": True, "threads": 1}, config, catalog), MODEL)
    assert (flagged.n_ctx, flagged.flash_attn, flagged.threads) == (512, True, 1)
    assert Sampling.from_settings(merge({}, {"temperature": 0.5}, catalog)).temperature == 0.5


def test_the_engines_last_check_names_the_setting_not_a_flag():
    with pytest.raises(UsageError, match="^threads must be 1 or more"):
        EngineOptions(MODEL, threads=0).validate()
    with pytest.raises(UsageError, match=r"^top_p must be in \(0, 1\]"):
        Sampling(top_p=0).validate()


def test_a_misspelt_setting_name_is_a_programming_error_not_ignored():
    with pytest.raises(TypeError, match="flash_atn"):
        merge({"flash_atn": False}, {}, {})
