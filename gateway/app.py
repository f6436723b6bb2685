"""The gateway's aiohttp application: OpenAI-compatible HTTP in front of NATS.

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /v1/usage (the caller's tenant), GET /health, GET /ready?model=ID, GET /metrics. With a
tenants file (gateway.tenancy) keys name tenants, another tenant's private model answers 404
as an unknown one does, and each generation holds a rate-limit ticket until it ends.
Errors are mapped in one middleware (gateway.errors). A request is bounded before anything
is published: its body by what one bus message carries (413), its prompt by the model's
context window, every value by its range (openai_api). A stream waits for its first chunk
before sending headers, so a request that fails before producing a token still gets its
proper HTTP status and error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from aiohttp import web

from gateway import openai_api
from gateway.core import GatewayCore, RequestStream, error_of
from gateway.errors import RETRY_AFTER_S, error_middleware, error_payload
from gateway.metrics import GatewayMetrics
from gateway.tenancy import TenantGate
from services import keys, natsutil, slo
from services.config import GatewayConfig
from services.errors import C2CError, ErrorCode, ModelNotFound, RequestTooLarge
from services.schemas import FINISH_REASON_TEXT, RequestKind
from services.tenants import Tenant

log = logging.getLogger(__name__)
CORE = web.AppKey("core", GatewayCore)
METRICS = web.AppKey("metrics", GatewayMetrics)
CONFIG = web.AppKey("config", GatewayConfig)
TENANCY = web.AppKey("tenancy", TenantGate)
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
    app[TENANCY] = TenantGate(config, app[METRICS].registry)
    app.cleanup_ctx.append(_core_ctx)
    app.cleanup_ctx.append(_tenancy_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/usage", usage)
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


async def _tenancy_ctx(app: web.Application):
    await app[TENANCY].start(app[CORE].redis)  # a bad tenants file stops the gateway here
    yield
    await app[TENANCY].stop()


def _check_auth(request: web.Request) -> Tenant | None:
    """The caller's tenant (None without a tenants file); 401 for a missing or wrong key."""
    return request.app[TENANCY].authenticate(request.headers.get("Authorization", ""))


async def _check_visible_model(request: web.Request, model_id: str, tenant: Tenant | None):
    """The catalog entry; another tenant's private model raises the unknown model's 404."""
    entry = await request.app[CORE].check_model(model_id)
    if not request.app[TENANCY].is_visible(entry, tenant):
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    return entry


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
    tenant = _check_auth(request)
    req = openai_api.parse_request(kind, await _read_json(request))
    core = request.app[CORE]
    entry = await _check_visible_model(request, req.model, tenant)
    openai_api.check_context(req, entry.context_window)
    for submit in req.choice_submits:  # every choice's own request (n, prompt arrays)
        submit.tenant = tenant.name if tenant is not None else ""
        slo.apply(submit, entry, request.app[CONFIG].ttft_slo_ms, request.app[CONFIG].tpot_slo_ms)  # one source
    choices = req.choices()  # n x prompts requests of their own (gateway.openai_extras)
    for choice in choices:
        openai_api.check_context(choice, entry.context_window)
        openai_api.check_bus_size(choice.submit, core.nc.max_payload)  # nothing published can fail to encode
    async with request.app[TENANCY].admit(tenant, req) as ticket:  # 429 over a limit; released on any exit
        async with contextlib.AsyncExitStack() as opened:
            streams = [await opened.enter_async_context(core.open(choice)) for choice in choices]
            for stream in streams:
                ticket.watch(stream)
            firsts = await _first_chunks(streams)
            if req.stream:
                return await _stream_response(request, req, streams, firsts)
            return await _full_response(req, streams, firsts)


async def _first_chunks(streams: list[RequestStream]) -> list:
    """Each choice's first chunk (all of them before any header is sent); the first error
    of any choice is the response's."""
    if len(streams) == 1:
        firsts = [await streams[0].next_chunk()]
    else:
        firsts = await asyncio.gather(*(s.next_chunk() for s in streams), return_exceptions=True)
    for first in firsts:
        if isinstance(first, BaseException):
            raise first
        if first.error_code:
            raise error_of(first)
    return firsts


async def _chunks(streams: list[RequestStream], firsts: list):
    """(choice index, chunk or the C2CError that ended its stream), in arrival order, until
    every choice has its final chunk; one stream is read directly, several through a queue."""
    if len(streams) == 1:
        stream, chunk = streams[0], firsts[0]
        yield 0, chunk
        while not chunk.is_final:
            try:
                chunk = await stream.next_chunk()
            except C2CError as exc:
                yield 0, exc
                return
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    for index, first in enumerate(firsts):
        queue.put_nowait((index, first))
    tasks = [asyncio.create_task(_pump(i, s, c, queue)) for i, (s, c) in enumerate(zip(streams, firsts, strict=True))]
    try:
        num_open = len(streams)
        while num_open:
            index, item = await queue.get()
            num_open -= isinstance(item, C2CError) or item.is_final
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _pump(index: int, stream: RequestStream, chunk, queue: asyncio.Queue) -> None:
    """One choice's chunks after its first, onto the merged queue; whatever ends it early
    goes there too as a C2CError (the reader must never wait for a pump that died)."""
    while not chunk.is_final:
        try:
            chunk = await stream.next_chunk()
        except C2CError as exc:
            queue.put_nowait((index, exc))
            return
        except Exception as exc:  # a bug: this request fails, the gateway goes on
            stream.rlog.exception("reading choice %d failed", index)
            queue.put_nowait((index, C2CError(f"reading the response failed: {exc}", code=ErrorCode.INTERNAL)))
            return
        queue.put_nowait((index, chunk))


class _Choice:
    """One choice's output as it arrives: text (after an echoed prompt), logprobs, finish."""

    def __init__(self, req, index: int, first_chunk) -> None:
        prompt = (req.choice_submits[index] if req.choice_submits else req.submit).prompt
        is_echo = req.kind == RequestKind.COMPLETION and req.submit.echo
        self.echo = (prompt if prompt is not None else first_chunk.prompt_text) if is_echo else ""
        self.parts: list[str] = [self.echo]
        self.num_chars = len(self.echo)  # text offset of the next chunk's first token
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.is_first = True  # no delta sent yet (the echo goes with the first)

    def add(self, chunk) -> openai_api.ChoiceOutput:
        """This chunk's delta: its text (after the echo, on the first delta) and logprobs."""
        text = (self.echo if self.is_first else "") + chunk.text
        out = openai_api.ChoiceOutput(text, FINISH_REASON_TEXT[chunk.finish_reason], list(chunk.logprobs),
                                      offset=self.num_chars)
        self.parts.append(chunk.text)
        self.num_chars += len(chunk.text)
        self.logprobs += chunk.logprobs
        if chunk.is_final:
            self.finish_reason = out.finish_reason
        return out

    def output(self) -> openai_api.ChoiceOutput:
        return openai_api.ChoiceOutput("".join(self.parts), self.finish_reason, self.logprobs, offset=len(self.echo))


async def _full_response(req, streams: list[RequestStream], firsts: list) -> web.Response:
    choices = [_Choice(req, i, first) for i, first in enumerate(firsts)]
    async with contextlib.aclosing(_chunks(streams, firsts)) as chunks:
        async for index, chunk in chunks:
            if isinstance(chunk, C2CError):
                raise chunk
            if chunk.error_code:
                raise error_of(chunk)
            choices[index].add(chunk)
    _record_tokens(req, streams)
    body = openai_api.full_response(req, [c.output() for c in choices], _usage(req, streams))
    return web.json_response(body, headers=_c2c_headers(req, streams))


def _record_tokens(req, streams: list[RequestStream]) -> None:
    """Token metrics of a request that finished well: each prompt once, every choice's output."""
    for i, stream in enumerate(streams):
        num_prompt = stream.num_prompt_tokens if i % req.n == 0 else 0
        stream.m.observe_finished(req.model, stream.worker_id, num_prompt, stream.num_generated_tokens)
        if i % req.n == 0:
            stream.m.child(stream.m.request_params_n, req.model).observe(req.n)


def _usage(req, streams: list[RequestStream]) -> dict:
    """Each prompt's tokens once (not once per sample, as vLLM counts), every choice's output."""
    num_prompt = sum(s.num_prompt_tokens for i, s in enumerate(streams) if i % req.n == 0)
    return openai_api.usage(num_prompt, sum(s.num_generated_tokens for s in streams))


def _c2c_headers(req, streams: list[RequestStream]) -> dict[str, str]:
    """Which request, which workers served it, whether it paid a cold start, and the
    request fields that were ignored (unknown to this API)."""
    headers = {"X-Request-Id": req.id, "X-Worker-Id": ",".join(dict.fromkeys(s.worker_id for s in streams)),
               "X-Cold-Start": "true" if any(s.cold_start for s in streams) else "false"}
    if req.ignored_fields:
        headers["X-Ignored-Fields"] = openai_api.ignored_fields_header(req.ignored_fields)
    return headers


async def _write_delta(response: web.StreamResponse, req, choice: _Choice, index: int, chunk) -> None:
    """A choice's text delta (with its logprobs; the role on its first), its finish chunk."""
    out = choice.add(chunk)
    if out.text or choice.is_first or out.logprobs:
        await response.write(_sse(openai_api.stream_chunk(req, out.text, None, first=choice.is_first,
                                                          index=index, out=out)))
        choice.is_first = False
    if chunk.is_final:
        empty = None if req.kind == RequestKind.CHAT else ""
        await response.write(_sse(openai_api.stream_chunk(req, empty, out.finish_reason, index=index)))


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _stream_response(request: web.Request, req, streams: list[RequestStream], firsts: list) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_c2c_headers(req, streams),
    })
    await response.prepare(request)
    try:
        await _write_stream(response, req, streams, firsts)
    except ConnectionResetError:
        streams[0].rlog.info("client disconnected mid-stream")
    return response


async def _write_stream(response: web.StreamResponse, req, streams: list[RequestStream], firsts: list) -> None:
    """Each choice's deltas as they come (a chunk names its choice's index), then each
    choice's finish chunk; the usage chunk after all of them; an error ends the stream."""
    choices = [_Choice(req, i, first) for i, first in enumerate(firsts)]
    is_failed = False
    async with contextlib.aclosing(_chunks(streams, firsts)) as chunks:
        async for index, chunk in chunks:
            if isinstance(chunk, C2CError) or chunk.error_code:
                await response.write(_sse(error_payload(chunk if isinstance(chunk, C2CError) else error_of(chunk))))
                is_failed = True
                break
            await _write_delta(response, req, choices[index], index, chunk)
    if not is_failed:
        _record_tokens(req, streams)
    if req.include_usage and not is_failed:
        await response.write(_sse(openai_api.usage_chunk(req, _usage(req, streams))))
    await response.write(_DONE)
    await response.write_eof()


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the catalog (refreshed from Redis), less other tenants' private models."""
    tenant = _check_auth(request)
    core, tenancy = request.app[CORE], request.app[TENANCY]
    await core.refresh_catalog()
    data = [{"id": e.model_id, "object": "model", "created": e.created_s, "owned_by": tenancy.owner(e)}
            for e in sorted(core.models.values(), key=lambda e: e.model_id) if tenancy.is_visible(e, tenant)]
    return web.json_response({"object": "list", "data": data})


async def usage(request: web.Request) -> web.Response:
    """GET /v1/usage: the caller's tenant's requests and tokens per model (shared by every
    gateway, in Redis), its limits and requests in flight; 404 without a tenants file."""
    tenant = _check_auth(request)
    if tenant is None:  # as before tenants existed: no such route
        raise web.HTTPNotFound()
    return web.json_response(await request.app[TENANCY].usage(tenant))


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
