"""The gateway's NATS side: submit requests, route reply chunks, abort, keep the catalog.

One wildcard subscription (`c2c.inbox.<gateway_id>.*`) receives every TokenChunk for
this process; each request owns an asyncio.Queue keyed by its request id. A submit with
no placer listening comes back as NATS "no responders" and becomes a NO_CAPACITY chunk,
so the client gets 503 at once instead of waiting for a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import msgspec
from nats.aio.msg import Msg

from gateway.metrics import GatewayMetrics
from gateway.openai_api import ParsedRequest
from services import catalog, natsutil, schemas, subjects
from services.config import GatewayConfig
from services.errors import C2CError, ErrorCode, ModelNotFound
from services.logutil import request_log
from services.schemas import FinishReason, TokenChunk

log = logging.getLogger(__name__)
_chunk_decoder = schemas.decoder(TokenChunk)
_ABORT_WAIT_S = 30.0


def error_of(chunk: TokenChunk) -> C2CError:
    code = ErrorCode(chunk.error_code) if chunk.error_code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
    return C2CError(chunk.error or code.name.lower().replace("_", " "), code=code)


class GatewayCore:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics):
        self.config = config
        self.metrics = metrics
        self.gateway_id = f"gw{uuid.uuid4().hex[:10]}"
        self.nc = None
        self.redis = None
        self.models: dict[str, schemas.ModelEntry] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.nc = await natsutil.connect_nats(self.config.nats_url, f"gateway-{self.gateway_id}", self.config.connect_timeout_s)
        self.redis = await natsutil.connect_redis(self.config.redis_url, self.config.connect_timeout_s)
        await self.nc.subscribe(subjects.gateway_inbox_all(self.gateway_id), cb=self._on_reply)
        await self.nc.flush()
        if self.config.models_dir:
            await catalog.register(self.redis, catalog.checkpoint_dirs(self.config.models_dir))
        await self.refresh_catalog()
        natsutil.spawn(self._refresh_loop(), self._tasks, "catalog refresh")
        log.info("gateway %s connected to NATS and Redis; %d models", self.gateway_id, len(self.models))

    async def stop(self) -> None:
        await natsutil.shutdown(self._tasks, self.nc, self.redis)

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def refresh_catalog(self) -> None:
        """Reload the catalog; on a Redis error keep the last one (logged)."""
        try:
            self.models = await catalog.load_all(self.redis)
        except natsutil.IO_ERRORS as exc:
            log.warning("catalog refresh failed, serving the last one: %s", exc)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.catalog_refresh_s)
            await self.refresh_catalog()

    async def check_model(self, model_id: str) -> schemas.ModelEntry:
        """The catalog entry; one Redis read on a miss; raises ModelNotFound (404)."""
        entry = self.models.get(model_id)
        if entry is None:
            try:
                entry = await catalog.lookup(self.redis, model_id)
            except natsutil.IO_ERRORS as exc:
                raise C2CError(f"model catalog unavailable: {exc}", code=ErrorCode.NO_CAPACITY) from None
            if entry is not None:
                self.models[model_id] = entry
        if entry is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return entry

    async def _on_reply(self, msg: Msg) -> None:
        request_id = subjects.request_id_of_inbox(msg.subject)
        queue = self._queues.get(request_id)
        if queue is None:
            return
        if natsutil.is_no_responders(msg):
            queue.put_nowait(TokenChunk(request_id, finish_reason=FinishReason.ERROR,
                                        error_code=ErrorCode.NO_CAPACITY, error="no placer or worker is listening"))
            return
        try:
            queue.put_nowait(_chunk_decoder.decode(msg.data))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("[req=%s] dropped a malformed chunk: %s", request_id, exc)

    def open(self, req: ParsedRequest) -> RequestStream:
        return RequestStream(self, req)


class RequestStream:
    """One request's life on the gateway: submit, chunks in order, abort if left unfinished."""

    def __init__(self, core: GatewayCore, req: ParsedRequest):
        self.core = core
        self.m = core.metrics
        self.req = req
        self.rlog = request_log(log, req.request_id)
        self.queue: asyncio.Queue[TokenChunk] = asyncio.Queue()
        self.worker_id = ""
        self.cold_start = False  # the first chunk's word: this request mapped/loaded its model
        self.finished = False
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.finish_reason = FinishReason.NONE
        self._start_s = time.monotonic()
        self._last_s = self._start_s
        self._got_first = False
        self.token_ids: list[int] = []  # generated so far (re-dispatch appends them to the prompt)
        self.num_chars = 0  # text characters received so far
        self._counted_worker = ""  # the worker label the running gauge was raised for

    async def __aenter__(self) -> RequestStream:
        core, submit = self.core, self.req.submit
        core._queues[submit.request_id] = self.queue
        self.m.child(self.m.waiting, self.req.model).inc()
        inbox = subjects.gateway_inbox(core.gateway_id, submit.request_id)
        await core.nc.publish(subjects.SUBMIT, schemas.encode(submit), reply=inbox)
        self.rlog.debug("submitted model=%s stream=%s", self.req.model, self.req.stream)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self._counted_worker:
            self.m.child(self.m.running, self.req.model, self._counted_worker).dec()
        if not self._got_first:
            self.m.child(self.m.waiting, self.req.model).dec()
        if self.finished:
            self.core._queues.pop(self.req.request_id, None)
            return
        self.m.child(self.m.requests, self.req.model, "aborted").inc()
        natsutil.spawn(self._abort(), self.core._tasks, "abort")

    async def _abort(self) -> None:
        """Abort on the worker; if no chunk named the worker yet, wait for the first one."""
        try:
            if not self.worker_id:
                chunk = await self._get(_ABORT_WAIT_S)
                self.worker_id = chunk.worker_id
                if chunk.is_final or not self.worker_id:
                    return
            abort = schemas.AbortRequest(self.req.request_id)
            await self.core.nc.publish(subjects.worker_abort(self.worker_id), schemas.encode(abort))
            self.rlog.info("client went away: abort sent to worker %s", self.worker_id)
        except TimeoutError:
            self.rlog.warning("client went away; no worker ever answered")
        finally:
            self.core._queues.pop(self.req.request_id, None)

    async def next_chunk(self) -> TokenChunk:
        """The next chunk; raises C2CError(TIMEOUT) when the worker goes quiet."""
        config = self.core.config
        timeout_s = config.chunk_timeout_s if self._got_first else config.first_chunk_timeout_s
        try:
            chunk = await self._get(timeout_s)
            while chunk.redispatch:
                await self._resubmit(chunk.worker_id)
                chunk = await self._get(config.first_chunk_timeout_s)
        except TimeoutError:
            self.finished = True  # nothing more will come; abort below would be moot
            self.m.child(self.m.requests, self.req.model, "timeout").inc()
            if self.worker_id:
                abort = schemas.AbortRequest(self.req.request_id, "gateway timeout")
                await self.core.nc.publish(subjects.worker_abort(self.worker_id), schemas.encode(abort))
            raise C2CError(f"no response from the workers within {timeout_s:.0f} s", code=ErrorCode.TIMEOUT) from None
        self._account(chunk)
        return chunk

    async def _get(self, timeout_s: float) -> TokenChunk:
        """The next queued chunk; no timer when one is already there (the streaming case)."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        async with asyncio.timeout(timeout_s):
            return await self.queue.get()

    async def _resubmit(self, dead_worker_id: str) -> None:
        """The worker died: submit again with the tokens the client already has."""
        submit = self.req.submit
        resumed = msgspec.structs.replace(
            submit, worker_id="", resumed_token_ids=list(self.token_ids), resumed_num_chars=self.num_chars,
        )
        if self._counted_worker:
            self.m.child(self.m.running, self.req.model, self._counted_worker).dec()
            self._counted_worker = ""
        self.worker_id = ""
        self.m.child(self.m.redispatches, self.req.model).inc()
        inbox = subjects.gateway_inbox(self.core.gateway_id, submit.request_id)
        await self.core.nc.publish(subjects.SUBMIT, schemas.encode(resumed), reply=inbox)
        self.rlog.warning("worker %s left mid-request: resubmitted with %d tokens already streamed",
                          dead_worker_id, len(self.token_ids))

    def _account(self, chunk: TokenChunk) -> None:
        m, now = self.m, time.monotonic()
        if chunk.worker_id:
            self.worker_id = chunk.worker_id
        if self.worker_id and not self._counted_worker:
            self._counted_worker = self.worker_id
            m.child(m.running, self.req.model, self.worker_id).inc()
        if not self._got_first:
            self._got_first = True
            m.child(m.waiting, self.req.model).dec()
            if chunk.error_code == 0:
                m.child(m.ttft_s, self.req.model, self.worker_id).observe(now - self._start_s)
                m.child(m.queue_s, self.req.model, self.worker_id).observe(chunk.queue_s)
            self.cold_start = chunk.cold_start
            if chunk.cold_start:
                m.child(m.cold_starts, self.req.model, self.worker_id).inc()
        elif chunk.token_ids:
            m.child(m.itl_s, self.req.model, self.worker_id).observe(now - self._last_s)
        self._last_s = now
        self.num_chars += len(chunk.text)
        if chunk.num_resumed_tokens:  # the rest of the streamed tokens are generated again
            del self.token_ids[chunk.num_resumed_tokens :]
        if chunk.token_ids:
            self.token_ids += chunk.token_ids
            m.child(m.tokens, self.req.model, self.worker_id).inc(len(chunk.token_ids))
        if chunk.is_final:
            self._finish(chunk, now)

    def _finish(self, chunk: TokenChunk, now: float) -> None:
        m = self.m
        self.finished = True
        self.finish_reason = chunk.finish_reason
        self.num_prompt_tokens = chunk.num_prompt_tokens
        self.num_generated_tokens = chunk.num_generated_tokens
        outcome = "error" if chunk.finish_reason == FinishReason.ERROR else "ok"
        m.child(m.requests, self.req.model, outcome).inc()
        if outcome == "ok":
            m.child(m.e2e_s, self.req.model, self.worker_id).observe(now - self._start_s)
        self.rlog.info("finished worker=%s reason=%s prompt=%d generated=%d in %.1f ms",
                       self.worker_id, chunk.finish_reason.name.lower(), chunk.num_prompt_tokens,
                       chunk.num_generated_tokens, (now - self._start_s) * 1e3)
