"""How run, serve and bench merge settings: flag, then config.toml, then catalog, then built-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from localchat.config import Config
from localchat.errors import UsageError
from localchat.models.catalog import ModelDefaults
from localchat.settings import engine_options_from, sampling_from

MODEL = Path("model.gguf")


def test_built_in_defaults_when_nothing_is_set():
    options = engine_options_from(Config(), ModelDefaults(), MODEL)
    assert (options.n_ctx, options.threads, options.use_mmap, options.flash_attn) == (
        None, None, True, True)
    assert not options.cpu_only and not options.use_mlock and not options.verbose


def test_a_flag_beats_the_config_which_beats_the_catalog():
    config = Config(ctx=2048, flash_attn=False, mmap=False, threads=3)
    catalog = ModelDefaults(ctx=8192, temperature=0.2)
    assert engine_options_from(config, catalog, MODEL).n_ctx == 2048
    assert engine_options_from(Config(), catalog, MODEL).n_ctx == 8192
    from_config = engine_options_from(config, catalog, MODEL, flash_attn=None, mmap=None)
    assert (from_config.flash_attn, from_config.use_mmap, from_config.threads) == (False, False, 3)
    flagged = engine_options_from(config, catalog, MODEL, ctx=512, flash_attn=True, threads=1)
    assert (flagged.n_ctx, flagged.flash_attn, flagged.threads) == (512, True, 1)
    sampling = sampling_from(Config(temperature=0.5), catalog, temperature=None, top_p=None,
                             top_k=None, min_p=None, repeat_penalty=None, seed=None,
                             max_tokens=None, stop=(), ignore_eos=False)
    assert sampling.temperature == 0.5


def test_bad_values_are_usage_errors_naming_the_flag():
    with pytest.raises(UsageError, match="--threads"):
        engine_options_from(Config(threads=0), ModelDefaults(), MODEL)


def test_a_misspelt_flag_name_is_a_programming_error_not_ignored():
    with pytest.raises(TypeError, match="flash_atn"):
        engine_options_from(Config(), ModelDefaults(), MODEL, flash_atn=False)
