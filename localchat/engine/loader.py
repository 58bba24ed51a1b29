"""The one way a model gets loaded: a local GGUF through its checked header, or a server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from localchat.engine.local import LocalEngine
from localchat.engine.options import EngineOptions

if TYPE_CHECKING:
    from localchat.engine.protocol import Engine
    from localchat.oneshot import Request


def load_engine(options: EngineOptions) -> LocalEngine:
    """The one way a model gets loaded: validate the file's header, then hand it to llama.cpp."""
    from localchat.models.gguf_reader import read_model_file

    info = read_model_file(options.model_path)
    return LocalEngine(options, info)


def open_engine(request: Request) -> Engine:
    """The local model through `load_engine`, or the server `--endpoint` names."""
    if request.remote is not None:
        from localchat.engine.remote import RemoteEngine

        return RemoteEngine(request.remote)
    assert request.engine is not None  # the CLI gives one or the other
    return load_engine(request.engine)
