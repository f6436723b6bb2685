"""The gateway's aiohttp application: OpenAI-compatible HTTP in front of NATS.

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health, GET /metrics. Errors are mapped in one middleware (gateway.errors). A request
is bounded before anything is published: its body by what one bus message carries (413),
its prompt by the model's context window, every value by its range (openai_api). A stream
waits for its first chunk before sending headers, so a request that fails before producing
a token still gets its proper HTTP status and error body.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from gateway import openai_api
from gateway.core import GatewayCore, RequestStream, error_of
from gateway.errors import RETRY_AFTER_S, error_middleware, error_payload
from gateway.metrics import GatewayMetrics
from services.config import GatewayConfig
from services.errors import C2CError, ErrorCode
from services.schemas import FINISH_REASON_TEXT, RequestKind

log = logging.getLogger(__name__)
CORE = web.AppKey("core", GatewayCore)
METRICS = web.AppKey("metrics", GatewayMetrics)
CONFIG = web.AppKey("config", GatewayConfig)
_DONE = b"data: [DONE]\n\n"


def create_app(config: GatewayConfig) -> web.Application:
    """The app factory (tests build it through `aiohttp_client(create_app(config))`)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=8 << 20)
    app[CONFIG] = config
    app[METRICS] = GatewayMetrics()
    app[RETRY_AFTER_S] = config.retry_after_s
    app.cleanup_ctx.append(_core_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def _core_ctx(app: web.Application):
    core = GatewayCore(app[CONFIG], app[METRICS])
    await core.start()
    app[CORE] = core
    yield
    await core.stop()


def _check_auth(request: web.Request) -> None:
    key = request.app[CONFIG].api_key
    if key and request.headers.get("Authorization", "") != f"Bearer {key}":
        raise C2CError("Incorrect API key provided", code=ErrorCode.UNAUTHORIZED)


async def _read_json(request: web.Request):
    """The body as strict JSON, at most what one bus message carries (413 past it)."""
    limit = openai_api.max_body_bytes(request.app[CORE].nc.max_payload)
    if request.content_length is not None and request.content_length > limit:
        raise openai_api.RequestTooLarge(f"the body has {request.content_length} bytes; at most {limit} fit "
                                         "on the message bus")
    raw = await request.read()  # aiohttp decompresses gzip/deflate here (corrupt: RequestPayloadError)
    if len(raw) > limit:
        raise openai_api.RequestTooLarge(f"the body has {len(raw)} bytes (decoded); at most {limit} fit "
                                         "on the message bus")
    return openai_api.decode_body(raw, request.headers.get("Content-Type", ""))


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions -> SubmitRequest on c2c.sched.submit; TokenChunks back."""
    return await _generate(request, RequestKind.COMPLETION)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions -> SubmitRequest (messages) on c2c.sched.submit."""
    return await _generate(request, RequestKind.CHAT)


async def _generate(request: web.Request, kind: RequestKind) -> web.StreamResponse:
    _check_auth(request)
    req = openai_api.parse_request(kind, await _read_json(request))
    core = request.app[CORE]
    entry = await core.check_model(req.model)
    openai_api.check_context(req, entry.context_window)
    openai_api.check_bus_size(req.submit, core.nc.max_payload)  # nothing published can fail to encode
    async with core.open(req) as stream:
        first = await stream.next_chunk()
        if first.error_code:
            raise error_of(first)
        if req.stream:
            return await _stream_response(request, req, stream, first)
        return await _full_response(req, stream, first)


async def _full_response(req, stream: RequestStream, chunk) -> web.Response:
    parts = [chunk.text]
    while not chunk.is_final:
        chunk = await stream.next_chunk()
        parts.append(chunk.text)
    if chunk.error_code:
        raise error_of(chunk)
    usage = openai_api.usage(stream.num_prompt_tokens, stream.num_generated_tokens)
    body = openai_api.full_response(req, "".join(parts), FINISH_REASON_TEXT[chunk.finish_reason], usage)
    return web.json_response(body, headers=_c2c_headers(req, stream))


def _c2c_headers(req, stream: RequestStream) -> dict[str, str]:
    """Which request, which worker served it, and whether it paid a cold start."""
    return {"X-Request-Id": req.request_id, "X-Worker-Id": stream.worker_id,
            "X-Cold-Start": "true" if stream.cold_start else "false"}


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _stream_response(request: web.Request, req, stream: RequestStream, chunk) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_c2c_headers(req, stream),
    })
    await response.prepare(request)
    try:
        await _write_stream(response, req, stream, chunk)
    except ConnectionResetError:
        stream.rlog.info("client disconnected mid-stream")
    return response


async def _write_stream(response: web.StreamResponse, req, stream: RequestStream, chunk) -> None:
    first = True
    while True:
        if chunk.error_code:
            await response.write(_sse(error_payload(error_of(chunk))))
            break
        if chunk.text or first:
            await response.write(_sse(openai_api.stream_chunk(req, chunk.text, None, first=first)))
            first = False
        if chunk.is_final:
            reason = FINISH_REASON_TEXT[chunk.finish_reason]
            await response.write(_sse(openai_api.stream_chunk(req, None if req.kind == RequestKind.CHAT else "", reason)))
            if req.include_usage:
                usage = openai_api.usage(stream.num_prompt_tokens, stream.num_generated_tokens)
                await response.write(_sse(openai_api.usage_chunk(req, usage)))
            break
        try:
            chunk = await stream.next_chunk()
        except C2CError as exc:
            await response.write(_sse(error_payload(exc)))
            break
    await response.write(_DONE)
    await response.write_eof()


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the catalog (refreshed from Redis)."""
    _check_auth(request)
    core = request.app[CORE]
    await core.refresh_catalog()
    data = [{"id": e.model_id, "object": "model", "created": e.created_s, "owned_by": e.owner}
            for e in sorted(core.models.values(), key=lambda e: e.model_id)]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 when connected to NATS, else 503."""
    ok = request.app[CORE].is_connected
    return web.json_response({"status": "ok" if ok else "degraded"}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
