"""Settings merged from their sources: flag over config.toml over catalog default over built-in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localchat.config import Config
from localchat.engine.local import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.models.catalog import ModelDefaults


def _pick(*candidates: Any) -> Any:
    """The first value that is set: flag, then config file, then catalog, then built-in."""
    return next((value for value in candidates if value is not None), None)


def sampling_from(config: Config, model: ModelDefaults, **flags: Any) -> Sampling:
    """Sampling settings from flags over config over the model's catalog defaults, validated."""
    builtin = Sampling()
    sampling = Sampling(
        temperature=_pick(flags["temperature"], config.temperature, model.temperature,
                          builtin.temperature),
        top_p=_pick(flags["top_p"], config.top_p, model.top_p, builtin.top_p),
        top_k=_pick(flags["top_k"], config.top_k, model.top_k, builtin.top_k),
        min_p=_pick(flags["min_p"], config.min_p, model.min_p, builtin.min_p),
        repeat_penalty=_pick(flags["repeat_penalty"], config.repeat_penalty,
                             model.repeat_penalty, builtin.repeat_penalty),
        seed=_pick(flags["seed"], config.seed),
        max_tokens=_pick(flags["max_tokens"], config.max_tokens),
        stop=flags["stop"],
        ignore_eos=flags["ignore_eos"],
    )
    sampling.validate()
    return sampling


LOAD_FLAGS = frozenset({"ctx", "threads", "gpu_layers", "cpu", "mmap", "mlock", "flash_attn",
                        "chat_format", "verbose"})


def engine_options_from(config: Config, model: ModelDefaults, model_path: Path,
                        **flags: Any) -> EngineOptions:
    """Load options from flags over config over the model's catalog defaults, validated.

    `flags` holds the command's LOAD_FLAGS by name; a missing or None flag falls through to the
    config.
    """
    unknown = set(flags) - LOAD_FLAGS
    if unknown:
        raise TypeError(f"unknown load flags: {sorted(unknown)}")
    options = EngineOptions(
        model_path=model_path,
        n_ctx=_pick(flags.get("ctx"), config.ctx, model.ctx),
        threads=_pick(flags.get("threads"), config.threads),
        gpu_layers=_pick(flags.get("gpu_layers"), config.gpu_layers),
        cpu_only=bool(flags.get("cpu")),
        use_mmap=_pick(flags.get("mmap"), config.mmap, True),
        use_mlock=bool(flags.get("mlock")),
        flash_attn=_pick(flags.get("flash_attn"), config.flash_attn, True),
        chat_format=_pick(flags.get("chat_format"), config.chat_format),
        verbose=bool(flags.get("verbose")),
    )
    options.validate()
    return options
