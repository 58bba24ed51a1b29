"""The OpenAI API: /v1/models, /v1/chat/completions and /v1/completions, streamed as
server-sent events or whole."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from localchat.engine import grammar
from localchat.engine.grammar import OutputGrammar
from localchat.engine.local import LocalEngine
from localchat.engine.reasoning import REASONING
from localchat.errors import LocalchatError
from localchat.serve import openai_api as api
from localchat.serve import openai_replies as replies
from localchat.serve import tools
from localchat.serve.generation import Reply
from localchat.serve.http import (
    ClosingStream,
    guarded,
    note,
    openai_error,
    read_json,
)
from localchat.serve.models import ServedModel, header_of
from localchat.serve.serving import Asked, Serving, Shown, gone_note, reply_note, whole_or_gone


def routes() -> list[Route]:
    """The /v1 routes, their errors in OpenAI's shape."""
    return [
        Route("/v1/models", guarded(_models, openai_error), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(_model, openai_error), methods=["GET"]),
        Route("/v1/chat/completions", guarded(_chat, openai_error), methods=["POST"]),
        Route("/v1/completions", guarded(_text, openai_error), methods=["POST"]),
    ]


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


async def _models(request: Request) -> Response:
    serving = _serving(request)
    entries = [replies.model_entry(model.id, serving.created, context_of(model))
               for model in serving.models.list()]
    return JSONResponse({"object": "list", "data": entries})


async def _model(request: Request) -> Response:
    serving = _serving(request)
    model = serving.find(request.path_params["model"])
    return JSONResponse(replies.model_entry(model.id, serving.created, context_of(model)))


def context_of(model: ServedModel) -> int:
    """The context window the model has (or will have) loaded: --ctx, else its trained length
    capped as the engine caps it."""
    from localchat.engine.options import DEFAULT_CONTEXT

    if model.options.n_ctx:
        return model.options.n_ctx
    info = header_of(model.path, model.modified)
    trained = info.context_length if info is not None else None
    return min(trained or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


async def _chat(request: Request) -> Response:
    return await _complete(request, "chat")


async def _text(request: Request) -> Response:
    return await _complete(request, "text")


async def _complete(request: Request, kind: str) -> Response:
    serving = _serving(request)
    body = await read_json(request, serving.client_timeout)
    name = body.get("model") if isinstance(body, dict) else None
    served = serving.find(name if isinstance(name, str) else None)
    parsed = api.parse_request(kind, body, served.sampling)
    shown, _ = await serving.open_reply(
        request, served, Asked(parsed.messages, parsed.prompt, parsed.sampling, parsed.options),
        lambda engine: _constraints(engine, parsed), "messages" if kind == "chat" else "prompt")
    meta = replies.new_meta(kind, uuid.uuid4().hex[:24], parsed.model or served.id)
    if parsed.stream:
        return ClosingStream(_events(request, serving, shown, parsed, meta),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    whole = await whole_or_gone(request, serving, shown)
    wanted = parsed.options.logprobs is not None
    return JSONResponse(replies.whole_reply(
        meta, whole.text, whole.stats, logprobs=whole.logprobs if wanted else None,
        tool_calls=[call.openai() for call in shown.calls], reasoning=whole.reasoning))


async def _events(request: Request, serving: Serving, shown: Shown, parsed: api.Request,
                  meta: replies.ReplyMeta) -> AsyncIterator[str]:
    """The reply as server-sent events; a client that leaves stops the generation."""
    reply: Reply = shown.reply
    wanted = parsed.options.logprobs is not None
    ended = False
    try:
        if meta.kind == "chat":
            yield _event(replies.chunk(meta, opening=True, logprobs=[] if wanted else None))
        offset = 0
        try:
            async for piece in shown:
                logprobs = list(piece.logprobs) if wanted else None
                if piece.kind == REASONING:
                    yield _event(replies.chunk(meta, reasoning=piece.text, logprobs=logprobs))
                    continue
                yield _event(replies.chunk(meta, text=piece.text, offset=offset, logprobs=logprobs))
                offset += len(piece.text)
        except Exception as exc:  # the engine failed mid-reply: say so in the stream
            ended = True
            note(request, f"error mid-reply: {exc}")
            yield _event(api.ApiError(500, str(exc), kind="server_error").body())
            return
        stats = reply.stats
        if stats is None or stats.finish_reason == "interrupted":  # the server is stopping
            yield _event(api.ApiError(503, "the server is stopping; the reply was cut short",
                                      kind="server_error").body())
            return
        ended = True
        calls = [call.openai() for call in shown.calls]
        if calls:
            yield _event(replies.chunk(meta, tool_calls=calls))
        yield _event(replies.chunk(meta, finish="tool_calls" if calls else stats.finish_reason))
        if parsed.include_usage:
            yield _event(replies.usage_chunk(meta, stats))
        yield "data: [DONE]\n\n"
        note(request, reply_note(stats))
    finally:
        if not ended:
            with anyio.CancelScope(shield=True):
                stats = await reply.close()
            if not serving.stopping.is_set():
                request.scope.setdefault("state", {})["client_gone"] = True
            note(request, gone_note(stats, serving.stopping.is_set()))


def _event(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _constraints(engine: LocalEngine, parsed: api.Request
                 ) -> tuple[str | None, OutputGrammar | None]:
    """How this model writes tool calls, and the grammar the reply keeps to: a call's (from
    its opening on, or from the start when a call is required) or `response_format`'s. A 400
    for tools the model's template cannot take, or a schema the grammar cannot enforce."""
    form = parsed.response_format
    if not parsed.options.tools:
        if form.type == "text":
            return None, None
        try:
            if form.type == "json_object":
                return None, grammar.json_grammar()
            return None, grammar.from_schema(form.schema, "response_format.json_schema.schema")
        except LocalchatError as exc:
            raise api.ApiError(400, str(exc), param="response_format") from None
    if form.type != "text":
        raise api.ApiError(400, "response_format and tools cannot be used together",
                           param="response_format")
    style = tools.style_of(engine.template)
    if style is None:
        raise api.ApiError(400, tools.no_tools_reason(engine.template), param="tools",
                           code="tools_not_supported")
    try:
        return style, tools.call_grammar(style, parsed.options.tools, parsed.tool_name,
                                         lazy=parsed.tool_choice == "auto")
    except LocalchatError as exc:
        raise api.ApiError(400, str(exc), param="tools") from None

