"""`localchat serve`: the models on disk over the OpenAI and Ollama APIs (serve/)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from localchat import render, settings
from localchat.commands.models import ensure_local, warn_beyond_training
from localchat.commands.options import (
    OfflineOption,
    VerboseOption,
    complete_model,
    env_of,
    given_settings,
    takes_settings,
)
from localchat.errors import UsageError


@takes_settings("serve")
def serve(
    context: typer.Context,
    models: Annotated[list[str] | None, typer.Argument(
        metavar="MODEL", autocompletion=complete_model, show_default=False,
        help="Models to load at start (any form, .gguf paths too); every model on disk is "
             "served either way, loaded on first request.")] = None,
    host: Annotated[str, typer.Option(
        metavar="ADDRESS", help="Address to listen on; 0.0.0.0 for all.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        metavar="N", help="Port to listen on; 0 picks a free one, 11434 is Ollama's.")] = 8080,
    api_key: Annotated[str | None, typer.Option(
        metavar="KEY", help="Require this key. [default: $LOCALCHAT_API_KEY]")] = None,
    max_loaded: Annotated[int | None, typer.Option(metavar="N", show_default=False, help=(
        "Models loaded at once; the least recently used is unloaded for the next. "
        "[default: 1, or the number of MODELs]"))] = None,
    queue: Annotated[int, typer.Option(metavar="N", help=(
        "Requests that may wait for a busy model; more get 429 with Retry-After."))] = 32,
    client_timeout: Annotated[float, typer.Option(metavar="SECONDS", help=(
        "How long a client may take to send a request's head, and then its body."))] = 30.0,
    verbose: VerboseOption = False,
    offline: OfflineOption = False,
    **flags: Any,
) -> None:
    """Serve the models on disk over the OpenAI API (/v1) and Ollama's API (/api).

    A request's sampling fields default to what `localchat run` would use for its model.
    """
    from localchat.config import load_config
    from localchat.models.catalog import resolve_model
    from localchat.serve import server
    from localchat.serve.models import ModelDirectory, describe_with

    env, given, config = env_of(context), given_settings(flags), load_config()
    describe = describe_with(
        lambda ref: settings.merge(given, config.settings, ref.defaults.settings), verbose)
    preload = []
    for ref in map(resolve_model, models or []):
        preload.append(describe(ref, ensure_local(ref, offline=offline, env=env)))
        warn_beyond_training(env, preload[-1].options)
    if max_loaded is not None and max_loaded < len(preload):
        raise UsageError(f"--max-loaded {max_loaded} is fewer than the {len(preload)} models "
                         "named to load at start", "raise --max-loaded or name fewer models")
    served = server.serve_settings(host, port, api_key, max_loaded=max_loaded or max(
        1, len(preload)), queue_size=queue, client_timeout=client_timeout, verbose=verbose)
    raise typer.Exit(server.serve(ModelDirectory(preload, describe), preload, served,
                                  lambda line: render.print_note(env, line)))
