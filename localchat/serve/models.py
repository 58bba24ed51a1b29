"""The models a server can serve: the names clients send, the files on disk, their settings.

A server serves every model on disk (catalog names, `owner/repo:QUANT` files in the Hugging Face
cache) and the models `serve` names (any form, `.gguf` paths included). A name in a request goes
through the one resolver (`models.catalog.resolve_model`), without paths: a client cannot make
the server open a file nobody listed. A model that is not on disk is a `NotServed` (a 404 naming
it); the server never downloads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.errors import LocalchatError

LISTING_TTL_S = 2.0  # how long one scan of the cache answers name lookups and listings


class NotServed(LocalchatError):
    """A request for a model this server cannot serve (unknown, or not on disk)."""


@dataclass(frozen=True)
class ServedModel:
    """One model a client can ask for, with the settings it loads and answers with."""

    id: str  # the name /v1/models and /api/tags list
    path: Path
    options: EngineOptions  # how it loads: serve's flags, config.toml, its catalog defaults
    sampling: Sampling  # what a request's missing fields default to: `localchat run`'s
    quant: str | None = None
    parameters: str | None = None  # the catalog's label ("135M"), when it has one

    @property
    def size_bytes(self) -> int:
        """The file's size, 0 when it went away."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    @property
    def modified(self) -> float:
        """The file's modification time, as a Unix time (0 when it went away)."""
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @property
    def digest(self) -> str:
        """A stable identity for Ollama's `digest` field: the file's place, size and time."""
        key = f"{self.path}\0{self.size_bytes}\0{self.modified}"
        return hashlib.sha256(key.encode()).hexdigest()


# (ref, path) -> ServedModel: merges the settings for one model; the CLI supplies it, since the
# flags and config.toml are its to read.
Describe = Callable[[Any, Path], ServedModel]


class ModelDirectory:
    """Names to `ServedModel`s: the models `serve` named first, then whatever is on disk."""

    def __init__(self, named: Iterable[ServedModel], describe: Describe) -> None:
        self.named = tuple(named)
        self._describe = describe
        self._by_path: dict[Path, ServedModel] = {model.path: model for model in self.named}
        self._listing: tuple[float, tuple[ServedModel, ...]] = (0.0, ())
        self._lock = threading.Lock()  # listings may be refreshed from worker threads

    @property
    def default(self) -> ServedModel | None:
        """The model a request that names none gets: the first one `serve` named."""
        return self.named[0] if self.named else None

    def list(self) -> tuple[ServedModel, ...]:
        """Everything servable: the named models, then the models on disk, one entry a file."""
        with self._lock:
            stamp, listing = self._listing
            if time.monotonic() - stamp < LISTING_TTL_S:
                return listing
            from localchat.models.catalog import resolve_model
            from localchat.models.store import list_local_models

            seen = {model.path for model in self.named}
            found = list(self.named)
            try:
                local = list_local_models()
            except LocalchatError:
                local = []  # an unreadable user catalog: the named models are still served
            for model in local:
                if model.path in seen:
                    continue
                seen.add(model.path)
                try:
                    ref = resolve_model(model.name)
                except LocalchatError:
                    continue
                found.append(self._served(ref, model.path))
            self._listing = (time.monotonic(), tuple(found))
            return self._listing[1]

    def find(self, name: str) -> ServedModel:
        """The model a request names; `NotServed` when it is unknown or not on disk.

        Exact ids come first (so a listed id always works), then Ollama's `:latest` spelling of
        "the default tag", then the resolver: `smollm2` finds the file listed as `smollm2:135m`.
        """
        name = name.strip()
        bases = [name] + ([name.removesuffix(":latest")] if name.endswith(":latest") else [])
        for base in bases:
            for model in self.list():
                if model.id == base:
                    return model
        return self._resolve(bases[-1], name)

    def _resolve(self, base: str, asked: str) -> ServedModel:
        from localchat.models.catalog import resolve_model
        from localchat.models.store import find_local_model

        try:
            ref = resolve_model(base, allow_path=False)
        except LocalchatError as exc:
            raise NotServed(f"model '{asked}' not found: {exc.message}", exc.hint) from None
        path = find_local_model(ref)
        if path is None:
            raise NotServed(f"model '{asked}' is not on this machine",
                            f"`localchat pull {ref.name}` downloads it; the server never does")
        return self._served(ref, path)

    def _served(self, ref: Any, path: Path) -> ServedModel:
        with_path = self._by_path.get(path)
        if with_path is None:
            with_path = self._by_path[path] = self._describe(ref, path)
        return with_path


def describe_with(values_for: Callable[[Any], Mapping[str, Any]], verbose: bool) -> Describe:
    """A `Describe` from a function giving the merged settings of a model reference."""

    def describe(ref: Any, path: Path) -> ServedModel:
        values = values_for(ref)
        file = getattr(ref, "file", None)
        spec = getattr(ref, "spec", None)  # the catalog knows a thinking model the file may not
        options = EngineOptions.from_settings(values, path, verbose=verbose)
        if spec is not None and spec.thinking:
            options = dataclasses.replace(options, thinking=spec.thinking)
        return ServedModel(
            id=path.stem if ref.kind == "path" else ref.name, path=path, options=options,
            sampling=Sampling.from_settings(values), quant=_quant(ref, path),
            parameters=file.parameters if file is not None else None)

    return describe


def _quant(ref: Any, path: Path) -> str | None:
    from localchat.models.catalog import quant_of

    return getattr(ref, "quant", None) or quant_of(path.name)


@functools.lru_cache(maxsize=64)
def header_of(path: Path, mtime: float) -> Any:
    """The checked GGUF header of a served file (cached while the file is unchanged), or None."""
    from localchat.models.gguf_reader import read_model_file

    try:
        return read_model_file(path)
    except LocalchatError:
        return None
