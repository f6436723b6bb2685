"""The gateway's aiohttp application: OpenAI-compatible HTTP in front of NATS.

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health, GET /ready?model=ID, GET /metrics. Errors are mapped in one middleware
(gateway.errors). A request is bounded before anything is published: its body by what
one bus message carries (413), its prompt by the model's context window, every value by
its range (openai_api). A stream waits for its first chunk before sending headers, so a
request that fails before producing a token still gets its proper HTTP status and error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from gateway import openai_api
from gateway.core import GatewayCore, RequestStream, error_of
from gateway.errors import RETRY_AFTER_S, error_middleware, error_payload
from gateway.metrics import GatewayMetrics
from services import keys, natsutil
from services.config import GatewayConfig
from services.errors import C2CError, ErrorCode, RequestTooLarge
from services.schemas import FINISH_REASON_TEXT, RequestKind

log = logging.getLogger(__name__)
CORE = web.AppKey("core", GatewayCore)
METRICS = web.AppKey("metrics", GatewayMetrics)
CONFIG = web.AppKey("config", GatewayConfig)
_DONE = b"data: [DONE]\n\n"
_REDIS_TIMEOUT_S = 1.0  # /health and /ready answer 503 after this, never hang on Redis
_LIVE_FOR_S = 1.0  # a healthy answer is reused this long
_DEGRADED_FOR_S = 0.2  # an unhealthy one this long (so a starting cluster turns healthy soon)


class Liveness:
    """Live workers from their heartbeat keys (`c2c:worker:*`), cached so /health is cheap."""

    def __init__(self) -> None:
        self._answer: tuple[str, list[frozenset[str]]] = ("not checked yet", [])
        self._until_s = 0.0
        self._lock = asyncio.Lock()

    async def check(self, core: GatewayCore) -> tuple[str, list[frozenset[str]]]:
        """(why not healthy, "" if healthy; per live worker the models it is pinned to, empty: any)."""
        async with self._lock:
            if time.monotonic() >= self._until_s:
                self._answer = await self._probe(core)
                self._until_s = time.monotonic() + (_DEGRADED_FOR_S if self._answer[0] else _LIVE_FOR_S)
            return self._answer

    async def _probe(self, core: GatewayCore) -> tuple[str, list[frozenset[str]]]:
        if not core.is_connected:
            return "not connected to NATS", []
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT_S):
                rows = await _worker_rows(core.redis)
        except (TimeoutError, *natsutil.IO_ERRORS) as exc:
            return f"Redis unavailable: {str(exc) or 'no answer within 1 s'}", []
        if not rows:
            return "no worker heartbeat", []
        return "", [frozenset(m for m in row.get("pinned_models", "").split(",") if m) for row in rows]


async def _worker_rows(redis) -> list[dict[str, str]]:
    """The heartbeat hashes of live workers (SCAN, never KEYS)."""
    worker_keys = [k async for k in redis.scan_iter(match=keys.WORKER_PATTERN, count=500)]
    if not worker_keys:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for key in worker_keys:
            pipe.hgetall(key)
        rows = await pipe.execute(raise_on_error=False)
    return [row for row in rows if isinstance(row, dict) and row]


LIVENESS = web.AppKey("liveness", Liveness)


def create_app(config: GatewayConfig) -> web.Application:
    """The app factory (tests build it through `aiohttp_client(create_app(config))`)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=8 << 20)
    app[CONFIG] = config
    app[METRICS] = GatewayMetrics()
    app[RETRY_AFTER_S] = config.retry_after_s
    app[LIVENESS] = Liveness()
    app.cleanup_ctx.append(_core_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
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
        raise RequestTooLarge(f"the body has {request.content_length} bytes; at most {limit} fit "
                                         "on the message bus")
    raw = await request.read()  # aiohttp decompresses gzip/deflate here (corrupt: RequestPayloadError)
    if len(raw) > limit:
        raise RequestTooLarge(f"the body has {len(raw)} bytes (decoded); at most {limit} fit "
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
    """GET /health: 200 when connected to NATS and Redis and some worker heartbeats, else 503
    with the reason (answers cached ~1 s; Redis errors and stalls give 503 within ~1 s)."""
    reason, workers = await request.app[LIVENESS].check(request.app[CORE])
    if reason:
        return web.json_response({"status": "degraded", "reason": reason}, status=503)
    return web.json_response({"status": "ok", "num_workers": len(workers)})


async def ready(request: web.Request) -> web.Response:
    """GET /ready?model=ID: 200 when a live worker can serve the model (one pinned to it or to
    none), 404 (OpenAI body) for an unknown model, 503 otherwise; no model: any live worker."""
    model_id = request.query.get("model")
    core = request.app[CORE]
    if model_id is not None:
        await _check_model_quickly(core, openai_api.check_model_id(model_id))
    reason, workers = await request.app[LIVENESS].check(core)
    serving = [w for w in workers if model_id is None or not w or model_id in w]
    if not reason and not serving:
        reason = f"no live worker serves {model_id}"
    if reason:
        return web.json_response({"status": "not_ready", "model": model_id, "reason": reason}, status=503)
    return web.json_response({"status": "ready", "model": model_id, "num_workers": len(serving)})


async def _check_model_quickly(core: GatewayCore, model_id: str) -> None:
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT_S):
            await core.check_model(model_id)
    except TimeoutError:
        raise C2CError("model catalog unavailable: Redis did not answer", code=ErrorCode.NO_CAPACITY) from None


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
