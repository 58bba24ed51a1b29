"""Ollama's API: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/show, /api/ps,
/api/version, and a clear 501 for the endpoints that would change the models on disk."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from localchat.engine import grammar
from localchat.engine.grammar import OutputGrammar
from localchat.engine.local import LocalEngine
from localchat.engine.protocol import ReplyOptions
from localchat.engine.reasoning import REASONING
from localchat.errors import LocalchatError
from localchat.serve import ollama_api as api
from localchat.serve import tools
from localchat.serve.http import (
    ClosingStream,
    guarded,
    note,
    ollama_error,
    read_json,
)
from localchat.serve.models import ServedModel, header_of
from localchat.serve.openai_api import ApiError
from localchat.serve.openai_routes import context_of
from localchat.serve.serving import Asked, Serving, Shown, gone_note, reply_note, whole_or_gone

NDJSON = "application/x-ndjson"
_CHANGES_DISK = {
    "/api/pull": "pull", "/api/push": "push", "/api/create": "create", "/api/copy": "copy",
    "/api/delete": "delete", "/api/blobs/{digest}": "blob uploads",
}


def routes() -> list[Route]:
    """The /api routes, their errors in Ollama's shape; `/` answers as Ollama's does."""
    def route(path: str, handler: Any, methods: list[str]) -> Route:
        return Route(path, guarded(handler, ollama_error), methods=methods)

    return [
        Route("/", _root, methods=["GET", "HEAD"]),
        route("/api/version", _version, ["GET"]),
        route("/api/tags", _tags, ["GET"]),
        route("/api/ps", _ps, ["GET"]),
        route("/api/show", _show, ["POST"]),
        route("/api/chat", _chat, ["POST"]),
        route("/api/generate", _generate, ["POST"]),
        route("/api/embed", _embed, ["POST"]),
        route("/api/embeddings", _embed, ["POST"]),
        *(route(path, _unsupported, ["POST", "DELETE", "HEAD"]) for path in _CHANGES_DISK),
    ]


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


async def _root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")  # the text Ollama's clients probe for


async def _version(request: Request) -> Response:
    return JSONResponse({"version": api.API_VERSION})


async def _unsupported(request: Request) -> Response:
    what = _CHANGES_DISK.get(request.url.path, "this")
    if request.url.path.startswith("/api/blobs/"):
        what = "blob uploads"
    raise ApiError(501, f"localchat serve does not {what} models over the API; use the "
                   "localchat command on the server (localchat pull, localchat rm)")


async def _embed(request: Request) -> Response:
    raise ApiError(501, "localchat serve does not compute embeddings")


async def _tags(request: Request) -> Response:
    models = _serving(request).models.list()
    return JSONResponse({"models": [{"name": model.id, **_entry(model)} for model in models]})


def _entry(model: ServedModel) -> dict[str, Any]:
    return {"model": model.id, "modified_at": api.unix_time(model.modified),
            "size": model.size_bytes, "digest": model.digest, "details": _details(model)}


def _details(model: ServedModel) -> dict[str, Any]:
    info = header_of(model.path, model.modified)
    family = info.architecture if info is not None else None
    size = model.parameters or (api.size_label(info.parameter_count) if info else None)
    return api.details(family, size, model.quant or (info.quantization if info else None))


async def _ps(request: Request) -> Response:
    entries = []
    for model, engine, expires, size in _serving(request).registry.loaded():
        entries.append({"name": model.id, **_entry(model), "size": size,
                        "expires_at": api.unix_time(expires),
                        "size_vram": size if engine.info.gpu_layers else 0,
                        "context_length": engine.n_ctx})
    return JSONResponse({"models": entries})


async def _show(request: Request) -> Response:
    from localchat.engine import templates

    body = await read_json(request, _serving(request).client_timeout)
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "model is required")
    model = _find(request, name)
    info = header_of(model.path, model.modified)
    if info is None:
        raise ApiError(500, f"{model.id}: the model file cannot be read")
    try:
        template = templates.choose_template(info.chat_template, info.architecture,
                                             info.special_tokens, model.options.chat_format)
    except Exception:  # no template and no known family: `run` would say so at load
        template = None
    capabilities = ["completion"]
    if template is not None and tools.style_of(template):
        capabilities.append("tools")
    if template is not None and templates.thinking_of(template, info.special_tokens,
                                                      model.options.thinking):
        capabilities.append("thinking")
    return JSONResponse({
        "license": info.license or "", "modified_at": api.unix_time(model.modified),
        "modelfile": f"# localchat serves this file as it is\nFROM {model.path}\n",
        "parameters": api.parameters_text(model.sampling),
        "template": template.text or "" if template else "",
        "details": _details(model),
        "model_info": {**api.model_info(info.metadata, info.parameter_count),
                       f"{info.architecture}.context_length": context_of(model)},
        "capabilities": capabilities,
    })


def _find(request: Request, name: str) -> ServedModel:
    try:
        return _serving(request).find(name)
    except ApiError as exc:
        if exc.status == 404:  # Ollama's words for it, which its clients show
            raise ApiError(404, f"model '{name}' not found: {exc.message}") from None
        raise


async def _chat(request: Request) -> Response:
    return await _reply(request, "chat")


async def _generate(request: Request) -> Response:
    return await _reply(request, "generate")


async def _reply(request: Request, kind: str) -> Response:
    serving = _serving(request)
    started = time.perf_counter()
    body = await read_json(request, serving.client_timeout)
    name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise ApiError(400, "model is required")
    model = _find(request, name)
    parse = api.parse_chat if kind == "chat" else api.parse_generate
    parsed = parse(body, model.sampling)
    options = model.options.with_settings(parsed.load) if parsed.load else None
    if parsed.empty:  # Ollama's load and unload requests
        return await _load_or_unload(request, serving, model, parsed, options, started)
    asked = Asked(parsed.messages, parsed.prompt, parsed.sampling, ReplyOptions(
        logit_bias=parsed.logit_bias, logprobs=parsed.logprobs, tools=parsed.tools))
    shown, lease = await serving.open_reply(
        request, model, asked, lambda engine: _check(engine, parsed, name),
        "messages" if parsed.messages else "prompt", options, parsed.keep_alive)
    if parsed.stream:
        return ClosingStream(_lines(request, serving, shown, parsed, started, lease.load_s),
                             media_type=NDJSON)
    whole = await whole_or_gone(request, serving, shown)
    last = api.part(parsed.kind, parsed.model, whole.text, logprobs=whole.logprobs,
                    tool_calls=[call.ollama() for call in shown.calls], thinking=whole.reasoning)
    return JSONResponse(api.final(last, whole.stats, time.perf_counter() - started,
                                  lease.load_s))


async def _load_or_unload(request: Request, serving: Serving, model: ServedModel,
                          parsed: api.Request, options: Any, started: float) -> Response:
    if parsed.keep_alive == 0:
        await serving.registry.unload(model)
        reason = "unload"
        load_s = 0.0
    else:
        lease = await serving.lease(request, model, options)
        load_s = lease.load_s
        lease.release(parsed.keep_alive)
        reason = "load"
    return JSONResponse(api.final(api.part(parsed.kind, parsed.model), None,
                                  time.perf_counter() - started, load_s, reason))


def _check(engine: LocalEngine, parsed: api.Request, name: str
           ) -> tuple[str | None, OutputGrammar | None]:
    """What the model cannot do for this request is a 400, in Ollama's words where it has
    them; the tool-call style, and the grammar the reply keeps to (`format`, or a call's)."""
    if parsed.think and engine.thinking is None:
        raise ApiError(400, f'"{name}" does not support thinking')
    try:
        if parsed.format is not None:
            if parsed.tools:
                raise ApiError(400, "format and tools cannot be used together")
            return None, (grammar.json_grammar() if parsed.format == "json"
                          else grammar.from_schema(parsed.format, "format"))
        if not parsed.tools:
            return None, None
        style = tools.style_of(engine.template)
        if style is None:
            raise ApiError(400, f'"{name}" does not support tools: '
                           + tools.no_tools_reason(engine.template))
        return style, tools.call_grammar(style, parsed.tools, lazy=True)
    except LocalchatError as exc:
        raise ApiError(400, str(exc)) from None


async def _lines(request: Request, serving: Serving, shown: Shown, parsed: api.Request,
                 started: float, load_s: float) -> AsyncIterator[str]:
    """The reply as NDJSON: a line a piece, then the counts (`done`); a client that leaves
    stops the generation."""
    reply = shown.reply
    ended = False
    try:
        try:
            async for piece in shown:
                thinking = piece.kind == REASONING
                yield _line(api.part(parsed.kind, parsed.model, "" if thinking else piece.text,
                                     logprobs=piece.logprobs,
                                     thinking=piece.text if thinking else ""))
        except Exception as exc:  # the engine failed mid-reply: Ollama's error line
            ended = True
            note(request, f"error mid-reply: {exc}")
            yield _line({"error": str(exc)})
            return
        stats = reply.stats
        if stats is None or stats.finish_reason == "interrupted":  # the server is stopping
            yield _line({"error": "the server is stopping; the reply was cut short"})
            return
        ended = True
        last = api.part(parsed.kind, parsed.model,
                        tool_calls=[call.ollama() for call in shown.calls])
        note(request, reply_note(stats))
        yield _line(api.final(last, stats, time.perf_counter() - started, load_s))
    finally:
        if not ended:
            with anyio.CancelScope(shield=True):
                stats = await reply.close()
            if not serving.stopping.is_set():
                request.scope.setdefault("state", {})["client_gone"] = True
            note(request, gone_note(stats, serving.stopping.is_set()))


def _line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"
