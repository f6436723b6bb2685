"""The gateway's NATS side: submit requests, route reply chunks, abort, keep the catalog.

One wildcard subscription (`c2c.inbox.<gateway_id>.*`) receives every TokenChunk for
this process and hands it to its request's `RequestStream` (gateway.stream: fencing,
re-dispatch). A submit with no placer listening comes back as NATS "no responders" and
becomes a NO_CAPACITY chunk, so the client gets 503 at once instead of waiting for a
timeout. After the bus reconnects, every open stream is re-dispatched: chunks published
while the gateway was away are lost, and fencing drops the old assignment's late ones.
The gateway keeps `c2c:gateway:<id>` alive in Redis; workers abort the requests of a
gateway whose key is gone (its clients went with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import msgspec
from nats.aio.msg import Msg

from gateway.metrics import GatewayMetrics
from gateway.openai_api import ParsedRequest
from gateway.stream import RequestStream, error_of
from services import catalog, keys, natsutil, schemas, subjects
from services.config import GatewayConfig
from services.errors import C2CError, ErrorCode, ModelNotFound
from services.schemas import TokenChunk

__all__ = ["GatewayCore", "RequestStream", "error_of"]
log = logging.getLogger(__name__)
_chunk_decoder = schemas.decoder(TokenChunk)
_telemetry_decoder = schemas.decoder(schemas.WorkerState)
_BEAT_EVERY_S = 1.0
_BEAT_TTL_S = 5  # a worker aborts this gateway's requests this long after it died
BUS_GRACE_S = 5.0  # open streams wait this long for the bus to come back, then fail with 503


class GatewayCore:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics):
        self.config = config
        self.metrics = metrics
        self.gateway_id = f"gw{uuid.uuid4().hex[:10]}"
        self.nc = None
        self.redis = None
        self.models: dict[str, schemas.ModelEntry] = {}
        self.streams: dict[str, RequestStream] = {}
        self.model_roots = catalog.parse_roots(config.model_roots)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.nc = await natsutil.connect_nats(self.config.nats_url, f"gateway-{self.gateway_id}",
                                              self.config.connect_timeout_s, on_reconnected=self._on_reconnected,
                                              on_disconnected=self._on_disconnected)
        self.redis = await natsutil.connect_redis(self.config.redis_url, self.config.connect_timeout_s)
        await self._beat()
        await self.nc.subscribe(subjects.gateway_inbox_all(self.gateway_id), cb=self._on_reply)
        await self.nc.subscribe(subjects.TELEMETRY_ALL, cb=self._on_telemetry)  # the KV usage gauge
        await self.nc.flush()
        if self.config.models_dir:
            await catalog.register(self.redis, catalog.checkpoint_dirs(self.config.models_dir), self.model_roots)
        await self.refresh_catalog()
        natsutil.spawn(self._refresh_loop(), self._tasks, "catalog refresh")
        natsutil.spawn(self._beat_loop(), self._tasks, "gateway heartbeat")
        log.info("gateway %s connected to NATS and Redis; %d models", self.gateway_id, len(self.models))

    async def stop(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(*natsutil.IO_ERRORS):
                await self.redis.delete(keys.gateway(self.gateway_id))
        await natsutil.shutdown(self._tasks, self.nc, self.redis)

    def spawn(self, coro, what: str) -> asyncio.Task:
        return natsutil.spawn(coro, self._tasks, what)

    async def _beat(self) -> None:
        """c2c:gateway:<id> (TTL): workers abort the requests of a gateway that is gone."""
        await natsutil.beat(self.redis, keys.gateway(self.gateway_id), _BEAT_TTL_S, "gateway")

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(_BEAT_EVERY_S)
            await self._beat()

    async def _on_disconnected(self) -> None:
        self.spawn(self._fail_streams_unless_reconnected(), "bus grace")

    async def _fail_streams_unless_reconnected(self) -> None:
        await asyncio.sleep(BUS_GRACE_S)
        if self.is_connected:
            return
        log.warning("NATS still unreachable after %.0f s: failing %d open requests", BUS_GRACE_S, len(self.streams))
        for stream in list(self.streams.values()):
            stream.deliver(stream.local_error(ErrorCode.NO_CAPACITY, "the message bus is unavailable; retry shortly"))

    async def _on_reconnected(self) -> None:
        """The bus came back: chunks sent meanwhile are lost, so re-dispatch every stream."""
        log.warning("NATS reconnected: re-dispatching %d open requests", len(self.streams))
        for stream in list(self.streams.values()):
            stream.deliver(TokenChunk(stream.req.request_id, stream.worker_id, redispatch=True, epoch=stream.epoch))

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def refresh_catalog(self) -> None:
        """Reload the catalog; on a Redis error keep the last one (logged)."""
        try:
            self.models = await catalog.load_all(self.redis, self.model_roots)
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
                entry = await catalog.lookup(self.redis, model_id, self.model_roots)
            except natsutil.IO_ERRORS as exc:
                raise C2CError(f"model catalog unavailable: {exc}", code=ErrorCode.NO_CAPACITY) from None
            if entry is not None:
                self.models[model_id] = entry
        if entry is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return entry

    async def _on_reply(self, msg: Msg) -> None:
        request_id = subjects.request_id_of_inbox(msg.subject)
        stream = self.streams.get(request_id)
        if stream is None:
            return
        if natsutil.is_no_responders(msg):
            stream.no_responders()
            return
        try:
            stream.deliver(_chunk_decoder.decode(msg.data))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("[req=%s] dropped a malformed chunk: %s", request_id, exc)

    async def _on_telemetry(self, msg: Msg) -> None:
        """c2c.telemetry.* (WorkerState): each worker's KV cache usage, for /metrics."""
        try:
            telemetry = _telemetry_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.metrics.kv_usage.observe(telemetry.worker_id, telemetry.kv_free_frac)
        self.metrics.kv_tiers.observe(telemetry)

    def open(self, req: ParsedRequest) -> RequestStream:
        return RequestStream(self, req)
