"""`c2cserve worker`: one process per slice, serving requests with the engine.

Without `--slice-index` it discovers the slices (MIG, GPUs, or CPU core sets) and runs
one child process per slice. With it, it pins itself to that slice, builds the Engine,
and serves NATS subjects:

    c2c.worker.<id>.submit     SubmitRequest (reply = gateway inbox) -> TokenChunk stream
    c2c.worker.<id>.abort      AbortRequest
    c2c.worker.<id>.residency  ResidencyCommand (prewarm / evict)
    c2c.control.<id>           ControlUpdate -> Engine.set_control
    c2c.worker.<id>.migrate*   live migration of running requests (worker.migration)
    c2c.worker.<id>.pipeline   PipelineCommand -> Engine.reconfigure (stages online)
    c2c.stage.<id>             StageCall frames: stages of pipelines hosted on this slice
and publishes c2c.telemetry.<id> (~100 ms). A thread of its own keeps the heartbeat key
c2c:worker:<id> (TTL) alive (worker.heartbeat), so no compute stalls it. Requests of a
gateway that died (its key c2c:gateway:<id> gone) are aborted: nobody reads them.
On SIGTERM it drains: running requests move to other workers with their KV (live
migration, up to `drain_timeout_s`); the rest are handed back for re-dispatch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import msgspec
from nats.aio.msg import Msg

from services import catalog, keys, natsutil, schemas, subjects
from services.config import WorkerConfig, add_config_arguments, load_config
from services.errors import ErrorCode
from services.schemas import (
    AbortRequest,
    ControlUpdate,
    FinishReason,
    ResidencyAction,
    ResidencyCommand,
    SubmitRequest,
    TokenChunk,
    WorkerInfo,
    WorkerState,
)
from services.stage_wire import PipelineCommand
from worker.commands import Abort, AddModel, Control, Evict, Prewarm, Reconfigure, Submit
from worker.heartbeat import Heartbeat
from worker.slices import SliceSpec, apply_slice, discover_slices

log = logging.getLogger(__name__)
_ORPHAN_CHECK_S = 2.0  # a gateway's key missing on two checks in a row: its requests are aborted


def worker_id_for(config: WorkerConfig, spec: SliceSpec) -> str:
    if config.worker_id:
        return config.worker_id
    node = "".join(c if c.isalnum() or c in "-_" else "-" for c in config.node)
    return f"{node}-{spec.name}"


class WorkerService:
    def __init__(self, config: WorkerConfig, spec: SliceSpec):
        self.config = config
        self.spec = spec
        self.worker_id = worker_id_for(config, spec)
        self.nc = None
        self.redis = None
        self.loop_thread = None
        self.model_paths: dict[str, str] = {}
        self._out: asyncio.Queue[list[tuple[str, bytes]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._started_s = time.time()
        self.incarnation = uuid.uuid4().hex[:12]  # this process; a restart under the same id gets another
        self.heartbeat: Heartbeat | None = None
        self.stages = None  # worker.stage_server.StageServer: stages of pipelines on this slice
        self.model_roots = catalog.parse_roots(config.model_roots)
        self._missing_gateways: set[str] = set()  # gone at the last orphan check
        self.migrator = None  # worker.migration.Migrator, once the engine runs
        self._is_stopping = False

    def _build_engine(self):
        from worker.engine import Engine, EngineConfig

        c = self.config
        return Engine(EngineConfig(
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            chunk_size=c.chunk_size, kv_cache_bytes=c.kv_cache_bytes,
            # dedicated: pinned models; on a GPU slice they are copied into it whole (load)
            residency="load" if c.residency == "load" or (c.residency == "dedicated" and self.spec.backend == "cuda")
            else "host",
            load_budget_bytes=c.load_budget_bytes or None, num_threads=c.num_threads or None,
            device=self.spec.backend,
            # the slice's memory beyond the KV cache holds cached weight tiles
            device_cache_bytes=max(0, self.spec.memory_bytes - c.kv_cache_bytes),
            host_kv_bytes=c.host_kv_bytes,
        ))

    async def start(self) -> None:
        from worker.engine_loop import EngineLoop

        c = self.config
        self.nc = await natsutil.connect_nats(c.nats_url, f"worker-{self.worker_id}", c.connect_timeout_s,
                                              on_reconnected=self._on_reconnected)
        self.redis = await natsutil.connect_redis(c.redis_url, c.connect_timeout_s)
        engine = await natsutil.in_daemon_thread(self._build_engine)
        log.info("loading the compiled CPU kernels (a cold Numba cache compiles them first: about 75 s of CPU; "
                 "`python -m c2c_kernels.precompile` does that ahead, with progress)")
        await natsutil.in_daemon_thread(engine.warmup)  # kernels from the cache the launcher filled
        template = WorkerState(
            worker_id=self.worker_id, node=self.config.node, gpu=self.spec.gpu, backend=self.spec.backend,
            max_num_seqs=self.config.max_num_seqs, pinned_models=self.config.pinned_models,
            residency=self.config.residency, incarnation=self.incarnation)
        self.loop_thread = EngineLoop(engine, self.worker_id, asyncio.get_running_loop(), self._out.put_nowait,
                                      template)
        self.loop_thread.meter.start_probe()
        from worker.migration import Migrator

        self.migrator = Migrator(self.nc, self.redis, self.worker_id, c.node, self.loop_thread, self._ensure_model,
                                 self._out.join, lambda: self._is_stopping)
        await self._add_pinned_models()
        self.loop_thread.start()
        natsutil.spawn(self._publisher(), self._tasks, "chunk publisher")
        await self._subscribe()
        from worker.stage_server import StageServer

        self.stages = StageServer(c.nats_url, self.worker_id)  # this slice hosts pipeline stages too
        await self.stages.start(self.nc)
        await self._telemetry()  # placers know this worker before its heartbeat says "ready"
        self.heartbeat = Heartbeat(c.redis_url, keys.worker(self.worker_id), self._heartbeat_row,
                                   period_s=max(0.2, c.heartbeat_ttl_s / 3), ttl_s=c.heartbeat_ttl_s)
        await asyncio.to_thread(self.heartbeat.start)
        natsutil.spawn(self._every(c.telemetry_interval_s, self._telemetry), self._tasks, "telemetry")
        natsutil.spawn(self._every(_ORPHAN_CHECK_S, self._abort_orphans), self._tasks, "orphan check")
        natsutil.spawn(self._every(_ORPHAN_CHECK_S, self.migrator.drop_stale), self._tasks, "stale migrations")
        log.info("worker %s ready on %s (%s, residency=%s)", self.worker_id, self.spec.name, self.spec.profile, c.residency)

    async def _subscribe(self) -> None:
        wid = self.worker_id
        await natsutil.subscribe_typed(self.nc, subjects.worker_submit(wid), SubmitRequest, self.on_submit)
        await natsutil.subscribe_typed(self.nc, subjects.worker_abort(wid), AbortRequest, self.on_abort)
        await natsutil.subscribe_typed(self.nc, subjects.worker_residency(wid), ResidencyCommand, self.on_residency)
        await natsutil.subscribe_typed(self.nc, subjects.control(wid), ControlUpdate, self.on_control)
        await self.migrator.subscribe()
        await natsutil.subscribe_typed(self.nc, subjects.worker_pipeline(wid), PipelineCommand, self.on_pipeline)
        await self.nc.flush()  # subscribed at the server before the first telemetry says "ready"

    async def _add_pinned_models(self) -> None:
        for model_id in self.config.pinned_models:
            if await self._ensure_model(model_id):
                self.loop_thread.submit(Prewarm(model_id, self.model_paths[model_id]))
            else:
                log.warning("pinned model %s is not in the catalog", model_id)

    async def stop(self) -> None:
        """Leave cleanly: placers stop routing here, unfinished requests move elsewhere."""
        self._is_stopping = True
        await self._drain()
        for task in list(self._tasks):
            task.cancel()
        if self.nc is not None and self.nc.is_connected and self.loop_thread is not None:
            await self._telemetry(is_stopping=True)
        if self.heartbeat is not None:
            await asyncio.to_thread(self.heartbeat.stop)
        if self.loop_thread is not None:
            await asyncio.to_thread(self.loop_thread.stop)
            await self._hand_over(self.loop_thread.unfinished())
        if self.stages is not None:
            await self.stages.stop()
        await natsutil.close_nats(self.nc)
        if self.redis is not None:
            await self.redis.aclose()

    async def _drain(self) -> None:
        """Move the running requests to other workers with their KV (live migration)."""
        if self.migrator is None or self.nc is None or not self.nc.is_connected or self.config.drain_timeout_s <= 0:
            return
        await self._telemetry()  # is_stopping: placers route nothing more here
        num_moved = await self.migrator.drain(time.monotonic() + self.config.drain_timeout_s)
        if num_moved:
            log.info("drained: %d running requests moved to other workers with their KV", num_moved)

    async def _hand_over(self, unfinished: list[tuple[str, str, int]]) -> None:
        """Ask each gateway to resubmit its unfinished request (as if this worker died)."""
        if self.nc is None or not self.nc.is_connected:
            return
        while not self._out.empty():  # chunks already produced go first, in order
            for subject, payload in self._out.get_nowait():
                await self.nc.publish(subject, payload)
        await self._hand_back(unfinished)
        if unfinished:
            log.info("handed %d unfinished requests back for re-dispatch", len(unfinished))

    async def _hand_back(self, unfinished: list[tuple[str, str, int]]) -> None:
        """A redispatch chunk to each request's gateway: it resubmits with a new epoch."""
        for request_id, reply, epoch in unfinished:
            chunk = TokenChunk(request_id, self.worker_id, redispatch=True, epoch=epoch)
            await self.nc.publish(reply, schemas.encode(chunk))

    async def _on_reconnected(self) -> None:
        """The bus came back: chunks sent into the dying connection are lost without a word,
        so every request here is handed back for re-dispatch and stopped (its gateway
        resubmits it with a new epoch, here or elsewhere)."""
        if self.loop_thread is None:
            return
        unfinished = self.loop_thread.unfinished()
        log.warning("NATS reconnected: handing %d requests back for re-dispatch", len(unfinished))
        await self._hand_back(unfinished)
        for request_id, _, epoch in unfinished:
            self.loop_thread.submit(Abort(request_id, epoch))

    async def _ensure_model(self, model_id: str) -> bool:
        """Register a catalog model with the engine (one Redis read the first time)."""
        if model_id in self.model_paths:
            return True
        entry = await catalog.lookup(self.redis, model_id, self.model_roots)  # None outside the roots
        if entry is None:
            return False
        self.model_paths[model_id] = entry.path
        self.loop_thread.submit(AddModel(model_id, entry.path))
        return True

    async def on_submit(self, req: SubmitRequest, msg: Msg) -> None:
        """c2c.worker.<id>.submit (SubmitRequest) -> an `accepted` chunk at once, then
        TokenChunks on msg.reply; an unknown model or a model pinned elsewhere gets a final
        error chunk at once."""
        if msg.reply:  # the gateway now knows the assignment arrived (core NATS may drop it)
            await self.nc.publish(msg.reply, schemas.encode(
                TokenChunk(req.request_id, self.worker_id, epoch=req.epoch, accepted=True)))
        pinned = self.config.pinned_models
        if pinned and req.model_id not in pinned:
            await self._reply_error(req, msg.reply, ErrorCode.NO_CAPACITY, f"worker {self.worker_id} serves only {', '.join(pinned)}")
            return
        try:
            is_known = req.model_id in self.model_paths or await self._ensure_model(req.model_id)
        except natsutil.IO_ERRORS as exc:
            log.warning("[req=%s] catalog unavailable: %s", req.request_id, exc)
            await self._reply_error(req, msg.reply, ErrorCode.NO_CAPACITY, "the model catalog is unavailable; retry shortly")
            return
        if not is_known:
            await self._reply_error(req, msg.reply, ErrorCode.MODEL_NOT_FOUND, f"The model '{req.model_id}' does not exist")
            return
        self.loop_thread.submit(Submit(req, msg.reply))

    async def _reply_error(self, req: SubmitRequest, reply: str, code: ErrorCode, message: str) -> None:
        chunk = TokenChunk(req.request_id, self.worker_id, finish_reason=FinishReason.ERROR,
                           error_code=code, error=message, epoch=req.epoch)
        if reply:
            await self.nc.publish(reply, schemas.encode(chunk))

    def on_abort(self, abort: AbortRequest, msg: Msg) -> None:
        """c2c.worker.<id>.abort (AbortRequest): stop the request, free its slot."""
        self.loop_thread.submit(Abort(abort.request_id, abort.epoch))

    async def on_residency(self, cmd: ResidencyCommand, msg: Msg) -> None:
        """c2c.worker.<id>.residency (ResidencyCommand): prewarm (resident + mapped) or evict."""
        if cmd.action == ResidencyAction.PREWARM:
            if await self._ensure_model(cmd.model_id):
                self.loop_thread.submit(Prewarm(cmd.model_id, self.model_paths[cmd.model_id]))
            else:
                log.warning("prewarm of unknown model %s ignored", cmd.model_id)
        elif cmd.action == ResidencyAction.EVICT:
            self.loop_thread.submit(Evict(cmd.model_id))

    def on_control(self, update: ControlUpdate, msg: Msg) -> None:
        """c2c.control.<id> (ControlUpdate): new engine knobs."""
        knobs = update.knobs()
        if knobs:
            self.loop_thread.submit(Control(knobs))

    async def on_pipeline(self, cmd: PipelineCommand, msg: Msg) -> None:
        """c2c.worker.<id>.pipeline (PipelineCommand): serve the model as these stages from
        a later step on (an unknown model or a bad plan is logged and changes nothing)."""
        from worker.pipeline import StageSpec  # torch: only a slice's own process has it

        if not await self._ensure_model(cmd.model_id):
            log.warning("pipeline of unknown model %s ignored", cmd.model_id)
            return
        specs = tuple(StageSpec(s.start, s.end, s.place, s.stage_id) for s in cmd.stages)
        self.loop_thread.submit(Reconfigure(cmd.model_id, specs, self.config.nats_url))

    async def _publisher(self) -> None:
        """Publishes the engine thread's chunks in order."""
        while True:
            batch = await self._out.get()
            for subject, payload in batch:
                if subject:
                    await self.nc.publish(subject, payload)
            self._out.task_done()  # a migration waits for its request's last chunk (join)

    async def _every(self, period_s: float, action) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await action()
            except natsutil.IO_ERRORS as exc:
                log.warning("%s failed: %s", action.__name__, exc)

    async def _telemetry(self, is_stopping: bool = False) -> None:
        """c2c.telemetry.<id> (WorkerState): the engine thread's latest record of this worker."""
        t = msgspec.structs.replace(self.loop_thread.state, t_s=time.time(), is_stopping=is_stopping or self._is_stopping,
                                    stalled_s=self.loop_thread.stalled_s())
        await self.nc.publish(subjects.telemetry(self.worker_id), schemas.encode(t))

    async def _abort_orphans(self) -> None:
        """Abort the requests of gateways that are gone (key missing twice in a row)."""
        by_gateway: dict[str, list[str]] = {}
        for request_id, reply, _ in self.loop_thread.unfinished():
            by_gateway.setdefault(subjects.gateway_id_of_inbox(reply), []).append(request_id)
        by_gateway.pop("", None)
        if not by_gateway:
            self._missing_gateways.clear()
            return
        gateway_ids = list(by_gateway)
        found = await natsutil.keys_exist(self.redis, [keys.gateway(g) for g in gateway_ids])
        missing = {g for g, is_alive in zip(gateway_ids, found, strict=True) if not is_alive}
        for gateway_id in missing & self._missing_gateways:
            log.warning("gateway %s is gone: aborting its %d requests", gateway_id, len(by_gateway[gateway_id]))
            for request_id in by_gateway[gateway_id]:
                self.loop_thread.submit(Abort(request_id))
        self._missing_gateways = missing

    def _heartbeat_row(self) -> dict[str, str]:
        """c2c:worker:<id> (WorkerInfo fields, TTL), written by the heartbeat thread."""
        info = WorkerInfo(
            worker_id=self.worker_id, node=self.config.node, gpu=self.spec.gpu,
            slice_profile=self.spec.profile, memory_bytes=self.spec.memory_bytes,
            backend=self.spec.backend, residency=self.config.residency,
            pinned_models=self.config.pinned_models, started_s=self._started_s,
            private_weight_bytes=self.loop_thread.private_weight_bytes,
        )
        row = {k: (",".join(v) if isinstance(v, list) else str(v)) for k, v in schemas.to_json_dict(info).items()}
        row.setdefault("private_weight_bytes", "0")  # always there, 0 included (host mode)
        row["stalled_s"] = f"{self.loop_thread.stalled_s():.1f}"
        return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, WorkerConfig)


async def serve(config: WorkerConfig, spec: SliceSpec) -> None:
    # the engine thread runs Python between kernels: switch sooner so NATS I/O is not
    # left waiting for the GIL for the default 5 ms
    sys.setswitchinterval(0.0005)
    await natsutil.serve_until_signal(WorkerService(config, spec))


def _supervise(config: WorkerConfig, specs: list[SliceSpec]) -> int:
    """One child process per slice; SIGINT/SIGTERM stop them all."""
    base = [sys.executable, "-m", "services.cli", *sys.argv[1:]]
    children = []
    for spec in specs:
        argv = base + ["--slice-index", str(spec.index), "--num-slices", str(len(specs))]
        children.append(subprocess.Popen(argv, env=dict(os.environ)))
    log.info("started %d worker processes", len(children))

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return max(child.wait() for child in children)


def run(args: argparse.Namespace) -> int:
    config = load_config(WorkerConfig, args)
    specs = discover_slices(config.device, config.num_slices, config.node)
    if config.slice_index < 0 and len(specs) > 1:
        return _supervise(config, specs)
    index = max(0, config.slice_index)
    if index >= len(specs):
        from services.errors import C2CError

        raise C2CError(f"--slice-index {index}: this machine has {len(specs)} slices")
    apply_slice(specs[index])
    natsutil.run(serve(config, specs[index]))
    return 0
