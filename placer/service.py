"""`c2cserve placer`: routes each request to a slice (queue group "placer", scale freely).

Hot path (one submit): decode -> `placer.policy.choose_slice` over an in-memory view of
the workers (refreshed by telemetry, no Redis read) -> publish to the worker keeping the
gateway's inbox as reply subject. The assignment is written to Redis by a background
task, off the critical path, and read back by a placer that (re)starts, so a restarted or
second placer still re-dispatches the requests of a worker that dies. No slice -> a final
NO_CAPACITY chunk straight to the inbox, so the gateway answers 503 at once.

Liveness: a worker is dead when neither its heartbeat key (written by a thread of its own,
which no compute, JIT or tokenization delays) nor its telemetry was seen for
`worker_expiry_s`; it is stalled (not routed to) while its engine has had work without
finishing a step for `stall_timeout_s`. A dead worker's requests are re-dispatched
through their gateways with a new epoch; if it comes back, the placer aborts the
assignments it fenced off, so it drops them instead of computing for nobody.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid

import msgspec
from nats.aio.msg import Msg

from placer.policy import RequestView, choose_slice
from placer.prewarm import Prewarmer
from placer.rebalance import plan_moves
from services import keys, natsutil, schemas, subjects
from services.config import PlacerConfig, add_config_arguments, load_config
from services.errors import ErrorCode
from services.schemas import FinishReason, SubmitRequest, TokenChunk, WorkerInfo, WorkerState

log = logging.getLogger(__name__)
_submit_decoder = schemas.decoder(SubmitRequest)
_RECORD_EVERY_S = 0.05
_RECORD_MAX_KEYS = 256  # per script call, so one burst does not hold Redis for long
_RECORD_FIELDS = ("worker_id", "model_id", "reply", "t_s", "epoch")
# KEYS: c2c:req:<id>...; ARGV: ttl_s, n fields, n field names, then n values per key
_RECORD_SCRIPT = """
local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local base, fields = 2 + n * i, {}
  for f = 1, n do
    fields[2 * f - 1], fields[2 * f] = ARGV[2 + f], ARGV[base + f]
  end
  redis.call('HSET', key, unpack(fields))
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""
_SETTLE_S = 1.0  # a request shows up in its worker's telemetry within this
_DEPARTED_KEEP_S = 30.0  # a moved request shows up on its new worker's telemetry within this


def state_of_info(info: WorkerInfo) -> WorkerState:
    """A worker's state before its first telemetry: what its heartbeat record says."""
    return WorkerState(worker_id=info.worker_id, node=info.node, gpu=info.gpu, backend=info.backend,
                       pinned_models=list(info.pinned_models), residency=info.residency)


class Placer:
    def __init__(self, config: PlacerConfig):
        self.config = config
        self.nc = None
        self.redis = None
        self.views: dict[str, WorkerState] = {}
        self.last_seen_s: dict[str, float] = {}
        # worker -> the model of each request assigned since its last telemetry (which
        # does not count them yet): waiting there, and their models active there
        self.assigned_since_telemetry: dict[str, list[str]] = {}
        # worker -> request id -> (gateway inbox, monotonic time assigned, epoch): for re-dispatch
        self.inflight: dict[str, dict[str, tuple[str, float, int]]] = {}
        # worker declared dead -> request id -> the epoch fenced off (aborted if it comes back)
        self.fenced: dict[str, dict[str, int]] = {}
        self.incarnations: dict[str, str] = {}  # worker -> the process last heard from
        # request id -> (its assignment, monotonic time it left its worker's telemetry): finished,
        # or moved by a live migration (then adopted by the worker that reports it next)
        self.departed: dict[str, tuple[tuple[str, float, int], float]] = {}
        self._tasks: set[asyncio.Task] = set()
        self.placer_id = uuid.uuid4().hex[:8]
        self._unrecorded: dict[str, tuple[str, ...]] = {}  # request id -> _RECORD_FIELDS, not yet in Redis
        self.prewarmer: Prewarmer | None = None

    async def start(self) -> None:
        self.nc = await natsutil.connect_nats(self.config.nats_url, "placer", self.config.connect_timeout_s,
                                              on_reconnected=self._on_reconnected)
        self.redis = await natsutil.connect_redis(self.config.redis_url, self.config.connect_timeout_s)
        await self._load_heartbeats()
        await self._load_assignments()
        await self.nc.subscribe(subjects.SUBMIT, queue=subjects.PLACER_QUEUE, cb=self.on_submit)
        await natsutil.subscribe_typed(self.nc, subjects.TELEMETRY_ALL, WorkerState, self.on_telemetry)
        await self.nc.flush()  # the server has our subscriptions before we say we are ready
        natsutil.spawn(self._expire_loop(), self._tasks, "worker expiry")
        natsutil.spawn(self._record_loop(), self._tasks, "record assignments")
        if self.config.prewarm_interval_s > 0:
            self.prewarmer = Prewarmer(self.nc, self.redis, self.config.prewarm_budget_bytes)
            natsutil.spawn(self.prewarmer.run(self.config.prewarm_interval_s, self._live_views),
                           self._tasks, "prewarm")
        if self.config.rebalance_interval_s > 0:
            natsutil.spawn(self._rebalance_loop(), self._tasks, "rebalance")
        log.info("placer ready; %d workers known", len(self.views))

    async def stop(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(*natsutil.IO_ERRORS):
                await self.redis.delete(keys.placer(self.placer_id))
        await natsutil.shutdown(self._tasks, self.nc, self.redis)

    async def _load_heartbeats(self) -> None:
        """Seed the view from live heartbeat keys (a restarted placer routes at once)."""
        for info in await natsutil.live_workers(self.redis):
            self.views[info.worker_id] = state_of_info(info)
            self.last_seen_s[info.worker_id] = time.monotonic()

    async def _load_assignments(self) -> None:
        """Seed the in-flight table from the c2c:req:<id> records (a restarted placer)."""
        now_s, num_loaded = time.monotonic(), 0
        async for key in self.redis.scan_iter(match=keys.REQUEST_PATTERN, count=500):
            row = await self.redis.hgetall(key)
            if row.get("worker_id") and row.get("reply"):
                request_id = keys.request_id_of(key)
                epoch = int(row.get("epoch") or 0)
                self.inflight.setdefault(row["worker_id"], {})[request_id] = (row["reply"], now_s, epoch)
                num_loaded += 1
        for worker_id in self.inflight:  # judged by its heartbeat from now on, like any worker
            self.last_seen_s.setdefault(worker_id, now_s)
        if num_loaded:
            log.info("recovered %d recorded assignments", num_loaded)

    async def on_telemetry(self, t: WorkerState, msg: Msg) -> None:
        """c2c.telemetry.<id> (WorkerState): refresh that worker's view; abort what
        it still runs of assignments fenced off when it was declared dead."""
        if t.is_stopping:  # its unfinished requests come back through their gateways
            log.info("worker %s is stopping; no longer routed to", t.worker_id)
            self._forget(t.worker_id)
            self._depart(self.inflight.pop(t.worker_id, {}))  # a draining worker moves some elsewhere
            return
        if t.worker_id in self.fenced:
            await self._abort_fenced(t)
        if self.incarnations.get(t.worker_id, t.incarnation) != t.incarnation:
            await self._restarted(t)
        self.incarnations[t.worker_id] = t.incarnation
        now_s = time.monotonic()
        self.last_seen_s[t.worker_id] = now_s
        if t.stalled_s > self.config.stall_timeout_s:
            self.views.pop(t.worker_id, None)  # alive, but its engine makes no progress
        else:
            self.views[t.worker_id] = t  # the worker's own record: the policy's input as is
        self.assigned_since_telemetry.pop(t.worker_id, None)
        self._adopt_moved(t)
        inflight = self.inflight.get(t.worker_id)
        if inflight:  # forget finished requests (ones too new to show up yet are kept)
            running = set(t.request_ids)
            gone = [r for r, (_, at_s, _) in inflight.items() if r not in running and now_s - at_s > _SETTLE_S]
            self._depart({r: inflight.pop(r) for r in gone})

    def _depart(self, assignments: dict[str, tuple[str, float, int]]) -> None:
        now_s = time.monotonic()
        for request_id, assignment in assignments.items():
            self.departed[request_id] = (assignment, now_s)
        while self.departed:  # oldest first: drop what left long ago
            request_id, (_, left_s) = next(iter(self.departed.items()))
            if now_s - left_s < _DEPARTED_KEEP_S:
                break
            del self.departed[request_id]

    def _adopt_moved(self, t: WorkerState) -> None:
        """A request this worker reports under an epoch assigned to another worker was moved
        here (live migration): its re-dispatch, should this worker die, follows it."""
        inflight = self.inflight.get(t.worker_id, {})
        for request_id, epoch in zip(t.request_ids, t.request_epochs, strict=False):
            if request_id in inflight:
                continue
            found = self._take_assignment(request_id, epoch, t.worker_id)
            if found is not None:
                log.info("[req=%s] now on worker %s (moved with its KV)", request_id, t.worker_id)
                inflight = self.inflight.setdefault(t.worker_id, inflight)
                inflight[request_id] = found

    def _take_assignment(self, request_id: str, epoch: int, new_worker_id: str) -> tuple[str, float, int] | None:
        """The assignment of this request and epoch that left its worker or is on another one."""
        departed = self.departed.get(request_id)
        if departed is not None and departed[0][2] == epoch:
            return self.departed.pop(request_id)[0]
        for worker_id, assignments in self.inflight.items():
            found = assignments.get(request_id)
            if worker_id != new_worker_id and found is not None and found[2] == epoch:
                return assignments.pop(request_id)
        return None

    async def _restarted(self, t: WorkerState) -> None:
        """The worker restarted under the same id before its heartbeat expired: what the
        old process ran is lost; re-dispatch all but what the new one reports running."""
        log.warning("worker %s restarted (incarnation %s); re-dispatching what the old one ran",
                    t.worker_id, t.incarnation)
        running = set(t.request_ids)
        inflight = self.inflight.get(t.worker_id, {})
        lost = {r: a for r, a in inflight.items() if r not in running}
        self.inflight[t.worker_id] = {r: a for r, a in inflight.items() if r in running}
        await self._redispatch_assignments(t.worker_id, lost)

    async def _on_reconnected(self) -> None:
        """The bus came back: a submit forwarded into the dying connection is lost without a
        word, so every assignment is re-dispatched (fencing drops whatever was not lost)."""
        num = sum(len(a) for a in self.inflight.values())
        log.warning("NATS reconnected: re-dispatching %d assignments", num)
        for worker_id in list(self.inflight):
            await self._redispatch_assignments(worker_id, self.inflight.pop(worker_id), fence=False)

    async def _abort_fenced(self, t: WorkerState) -> None:
        fenced = self.fenced[t.worker_id]
        running = dict(zip(t.request_ids, t.request_epochs, strict=False))
        for request_id, epoch in list(fenced.items()):
            if running.get(request_id) == epoch:
                log.warning("[req=%s] worker %s came back with fenced epoch %d: aborting it", request_id, t.worker_id, epoch)
                abort = schemas.AbortRequest(request_id, "fenced: the worker was declared dead", epoch=epoch)
                await self.nc.publish(subjects.worker_abort(t.worker_id), schemas.encode(abort))
            else:
                del fenced[request_id]
        if not fenced:
            del self.fenced[t.worker_id]

    def _forget(self, worker_id: str) -> None:
        self.views.pop(worker_id, None)
        self.last_seen_s.pop(worker_id, None)

    async def _expire_loop(self) -> None:
        while True:
            await self._beat()
            await asyncio.sleep(min(0.5, self.config.worker_expiry_s / 3))
            await self._expire_silent_workers()

    async def _beat(self) -> None:
        """c2c:placer:<id> (TTL): the launcher waits for a placer before starting workers."""
        await natsutil.beat(self.redis, keys.placer(self.placer_id), max(1, int(self.config.worker_expiry_s)), "placer")

    async def _expire_silent_workers(self) -> None:
        await self._read_heartbeats()
        deadline = time.monotonic() - self.config.worker_expiry_s
        for worker_id in [w for w, seen in self.last_seen_s.items() if seen < deadline]:
            log.warning("worker %s: no heartbeat for %.1f s; declared dead, no longer routed to",
                        worker_id, self.config.worker_expiry_s)
            self._forget(worker_id)
            await self._redispatch(worker_id)

    async def _read_heartbeats(self) -> None:
        """A worker whose heartbeat key exists is alive, whatever its telemetry does."""
        worker_ids = list(self.last_seen_s)
        if not worker_ids:
            return
        try:
            alive = await natsutil.keys_exist(self.redis, [keys.worker(w) for w in worker_ids])
        except natsutil.IO_ERRORS as exc:  # no verdict without Redis: telemetry alone counts
            log.warning("could not read worker heartbeats: %s", exc)
            return
        now_s = time.monotonic()
        for worker_id, is_alive in zip(worker_ids, alive, strict=True):
            if is_alive:
                self.last_seen_s[worker_id] = now_s

    async def _redispatch(self, worker_id: str) -> None:
        """Tell each gateway whose request was on a dead worker to resubmit it.

        The gateway knows which tokens its client already got; it resubmits with them
        appended to the prompt, so the stream continues with no loss or duplicates.
        """
        await self._redispatch_assignments(worker_id, self.inflight.pop(worker_id, {}))

    async def _redispatch_assignments(self, worker_id: str, assignments: dict[str, tuple[str, float, int]],
                                      fence: bool = True) -> None:
        """A redispatch chunk to each request's gateway; `fence`: abort the epoch on the
        worker if it shows up there again (a worker taken for dead)."""
        for request_id, (reply, _, epoch) in assignments.items():
            log.warning("[req=%s] worker %s: re-dispatching epoch %d", request_id, worker_id, epoch)
            if fence:
                self.fenced.setdefault(worker_id, {})[request_id] = epoch
            chunk = TokenChunk(request_id, worker_id, redispatch=True, epoch=epoch)
            await self.nc.publish(reply, schemas.encode(chunk))

    async def _rebalance_loop(self) -> None:
        """Every rebalance_interval_s: a hot slice hands a running request to an idle one
        (`placer.rebalance`; the source picks the request and moves it with its KV)."""
        while True:
            await asyncio.sleep(self.config.rebalance_interval_s)
            for move in plan_moves(self._live_views()):
                log.info("rebalance: worker %s is hot, %s idle: moving a request", move.source_id, move.target_id)
                command = schemas.MigrateCommand("", target_worker_id=move.target_id)
                await self.nc.publish(subjects.worker_migrate(move.source_id), schemas.encode(command))

    def _live_views(self) -> list[WorkerState]:
        """The workers' records with the requests assigned since their last telemetry
        counted as waiting (and their models as active), and each one's link demand summed over its link domain (the
        slices of one GPU, or of one CPU node, share one link)."""
        domain_demand: dict[tuple[str, str], float] = {}
        for view in self.views.values():
            key = (view.node, view.gpu)
            domain_demand[key] = domain_demand.get(key, 0.0) + view.link_demand_gbps
        views = []
        for worker_id, view in self.views.items():
            assigned = self.assigned_since_telemetry.get(worker_id, [])
            new_models = set(assigned) - set(view.active_models)
            views.append(msgspec.structs.replace(view, num_waiting=view.num_waiting + len(assigned),
                                                 active_models=[*view.active_models, *sorted(new_models)],
                                                 link_demand_gbps=domain_demand[(view.node, view.gpu)]))
        return views

    async def on_submit(self, msg: Msg) -> None:
        """c2c.sched.submit (SubmitRequest, reply = gateway inbox) -> c2c.worker.<id>.submit.

        A malformed request or one no slice can take gets a final error chunk on the inbox.
        """
        try:
            req = _submit_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("malformed submit: %s", exc)
            return
        if self.prewarmer is not None:
            self.prewarmer.observe(req.model_id)
        # admission: a slice whose queued prefill alone outlasts max_queue_wait_s is not a candidate
        # the request's TPOT target keeps a slice whose step cycle is already past it from
        # taking on another model, unless no slice is under it
        view = RequestView(req.request_id, req.model_id, max(1, req.num_prompt_chars // 4), req.slo_class,
                           tpot_slo_ms=req.tpot_slo_ms, ttft_slo_ms=1000.0 * self.config.max_queue_wait_s,
                           max_wait_frac=1.0)
        views = self._live_views()
        worker_id = choose_slice(view, views)
        if worker_id is None and view.tpot_slo_ms > 0:
            worker_id = choose_slice(dataclasses.replace(view, tpot_slo_ms=0.0), views)
        if worker_id is None:
            await self._reject(req, msg.reply)
            return
        req.worker_id = worker_id
        if msg.reply:
            self.inflight.setdefault(worker_id, {})[req.request_id] = (msg.reply, time.monotonic(), req.epoch)
        self.assigned_since_telemetry.setdefault(worker_id, []).append(req.model_id)
        await self.nc.publish(subjects.worker_submit(worker_id), schemas.encode(req), reply=msg.reply)
        log.debug("[req=%s] model=%s -> worker %s", req.request_id, req.model_id, worker_id)
        self._unrecorded[req.request_id] = (worker_id, req.model_id, msg.reply or "", f"{time.time():.3f}", str(req.epoch))

    async def _reject(self, req: SubmitRequest, reply: str) -> None:
        reason = "no worker is running" if not self.views else (
            f"no worker can take model '{req.model_id}' now (all full, or more than "
            f"{self.config.max_queue_wait_s:.0f} s of prompts queued); retry later")
        log.info("[req=%s] rejected: %s", req.request_id, reason)
        if reply:
            chunk = TokenChunk(req.request_id, finish_reason=FinishReason.ERROR, epoch=req.epoch,
                               error_code=ErrorCode.NO_CAPACITY, error=reason)
            await self.nc.publish(reply, schemas.encode(chunk))

    async def _record_loop(self) -> None:
        """c2c:req:<id> (hash, TTL): assignments, written in batches off the hot path."""
        record = self.redis.register_script(_RECORD_SCRIPT)
        while True:
            await asyncio.sleep(_RECORD_EVERY_S)
            if not self._unrecorded:
                continue
            batch, self._unrecorded = self._unrecorded, {}
            try:
                for keys_, args in _record_calls(batch, self.config.request_ttl_s):
                    await record(keys=keys_, args=args)
            except natsutil.IO_ERRORS as exc:
                log.warning("could not record %d assignments: %s", len(batch), exc)


def _record_calls(batch: dict[str, tuple[str, ...]], ttl_s: int):
    """(KEYS, ARGV) of _RECORD_SCRIPT per slice of the batch: a script call costs the
    placer a fraction of what a pipelined HSET + EXPIRE per request does."""
    request_ids = list(batch)
    for lo in range(0, len(request_ids), _RECORD_MAX_KEYS):
        chunk = request_ids[lo:lo + _RECORD_MAX_KEYS]
        args: list = [ttl_s, len(_RECORD_FIELDS), *_RECORD_FIELDS]
        for request_id in chunk:
            args += batch[request_id]
        yield [keys.request(r) for r in chunk], args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PlacerConfig)


def run(args: argparse.Namespace) -> int:
    natsutil.run(natsutil.serve_until_signal(Placer(load_config(PlacerConfig, args))))
    return 0
