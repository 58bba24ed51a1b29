"""How a model is loaded: the options (the settings table's "load" rows), what the load
reports back, and the limits of the context window, apart from llama.cpp so that the commands,
the server and bench can read and check them without loading it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localchat import settings
from localchat.errors import UsageError

# --cache-type names and the ggml types llama.cpp takes for type_k / type_v
CACHE_GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_F16, _Q8_0, _Q4_0
DEFAULT_CONTEXT = 4096  # a sane cap: KV cache memory grows linearly with the window


# The "load" rows of the settings table and the EngineOptions fields that hold them.
_FIELDS = {"ctx": "n_ctx", "threads": "threads", "gpu_layers": "gpu_layers", "cpu": "cpu_only",
           "mmap": "use_mmap", "mlock": "use_mlock", "flash_attn": "flash_attn",
           "cache_type": "cache_type", "chat_format": "chat_format"}


@dataclass(frozen=True)
class EngineOptions:
    """How to load a model; every field but the path, verbosity and batch is a settings row."""

    model_path: Path
    n_ctx: int | None = None  # None: the model's trained length, capped at DEFAULT_CONTEXT
    threads: int | None = None  # None: physical cores
    gpu_layers: int | None = None  # None: all layers when a GPU backend is compiled in
    cpu_only: bool = False
    use_mmap: bool = True
    use_mlock: bool = False
    chat_format: str | None = None
    verbose: bool = False
    batch_size: int = 512
    flash_attn: bool = True  # llama.cpp's default too: faster prefill and early decode on CPU
    thinking: str | None = None  # the catalog's thinking family, for files that do not say
    cache_type: str = "f16"  # the KV cache's type (K and V); a quantized V needs flash_attn

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], model_path: Path,
                      verbose: bool = False) -> EngineOptions:
        """The load rows of merged settings (`settings.merge`) for the model at `model_path`."""
        return cls(model_path=model_path, verbose=verbose,
                   **{_FIELDS[name]: value
                      for name, value in settings.values_of("load", values).items()})

    def with_settings(self, values: Mapping[str, Any]) -> EngineOptions:
        """These options with some load rows changed, by setting name (Ollama's `num_ctx`...)."""
        return dataclasses.replace(self, **{_FIELDS[name]: value for name, value in values.items()})

    def validate(self) -> None:
        """The last check before llama.cpp: a value outside the settings table is a usage error
        naming the setting (the front ends check first, naming their flag or key)."""
        for setting in settings.in_scope("load"):
            problem = settings.check(setting, getattr(self, _FIELDS[setting.name]))
            if problem:
                raise UsageError(f"{setting.name} {problem}")
        check_cache_type(self.cache_type, self.flash_attn)


def check_cache_type(cache_type: str, flash_attn: bool) -> None:
    """A quantized KV cache needs flash attention: llama.cpp quantizes V only with it."""
    if cache_type != "f16" and not flash_attn:
        raise UsageError(f"a {cache_type} KV cache needs flash attention (llama.cpp quantizes "
                         "V only with it)", "drop --no-flash-attn, or use --cache-type f16")


@dataclass(frozen=True)
class LoadInfo:
    """How the model was loaded, for `--verbose`, `--json` and `/show`."""

    model_path: Path
    load_s: float
    n_ctx: int
    n_ctx_train: int | None  # None: the file does not say how long the model was trained on
    threads: int
    gpu_layers: int
    backend: str
    chat_format: str
    chat_format_source: str
    use_mmap: bool
    flash_attn: bool
    cache_type: str = "f16"
    kv_cache_bytes: int | None = None  # llama.cpp's own KV cache buffers for n_ctx
    # why `--draft auto` does not draft here (drafts could change the text); None: it drafts
    inexact_drafts: str | None = None


def context_hint(n_ctx: int, n_ctx_train: int | None, first: str) -> str:
    """What to do when the window is too small: raise --ctx only while the model allows it."""
    if n_ctx_train and n_ctx >= n_ctx_train:
        where = "at" if n_ctx == n_ctx_train else "past"
        return f"{first}: --ctx {n_ctx} is already {where} this model's trained length " \
               f"({n_ctx_train})"
    limit = f" (this model was trained on {n_ctx_train})" if n_ctx_train else ""
    return f"{first} or raise --ctx{limit}"


def context_warning(n_ctx: int | None, n_ctx_train: int | None) -> str | None:
    """The note for a window larger than the model was trained on, or None."""
    if not n_ctx or not n_ctx_train or n_ctx <= n_ctx_train:
        return None
    return (f"warning: --ctx {n_ctx} is beyond this model's trained length ({n_ctx_train}); "
            "llama.cpp runs it, but replies usually get worse past that length")
