"""Live migration between workers, the protocol (asyncio side): a running request moves with
its KV cache to another worker, and the client's stream goes on in the same epoch.

Source (`migrate`, on `c2c.worker.<id>.migrate` or while draining):
 1. offer (`migrate_offer`): the target reserves KV blocks for the request;
 2. pre-copy: the full blocks (no step writes them again) go while the request keeps
    decoding, written into a shared memory file (one node) or as bytes (`migrate_kv`);
 3. stop-and-copy: between two steps the request leaves the engine, its blocks kept; once
    its last chunk is on the bus, the commit (`migrate_commit`) carries its state and the
    blocks written since the pre-copy;
 4. the target acknowledges and resumes it, its first chunk naming the source
    (`TokenChunk.migrated_from`, the gateway's fencing switches over in sequence); only
    then does the source free the blocks. A refusal or no answer: the source cancels the
    reservation (`migrate_cancel`) and runs the request on as if nothing happened.
One worker serves a request at a time; a killed source leaves its requests to the
placer's re-dispatch. A target frees a reservation nobody talks to for `_STALE_S`. Should
a commit's answer be lost after the target resumed, both workers stream the same epoch:
the gateway takes the one in sequence and drops the other, or re-dispatches on a gap, so
nothing reaches the client twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg

from services import natsutil, schemas, subjects
from services.schemas import (
    KVBlocks,
    MigrateCommand,
    MigrationCancel,
    MigrationCommit,
    MigrationOffer,
    MigrationReply,
    MigrationResult,
)
from worker import handover, kv_transfer
from worker.block_manager import num_blocks_for
from worker.migration_policy import rank_targets, transport_for
from worker.sequence import SequenceStatus

log = logging.getLogger(__name__)
OFFER_TIMEOUT_S = 10.0  # the target may map the model first
STEP_TIMEOUT_S = 5.0
_STALE_S = 30.0


class MigrationFailed(Exception):
    """The request stays where it is (the reason in the message)."""


@dataclass
class _Outgoing:
    """What the source knows of one migration."""

    migration_id: str
    request_id: str
    model_id: str
    target_id: str
    transport: str
    kv_layout: list[int]
    block_size: int
    shm: kv_transfer.ShmKV | None = None
    num_sent_blocks: int = 0  # pre-copied
    num_preemptions: int = 0  # the sequence's, when the pre-copy read its blocks
    phases_ms: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str):
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self.phases_ms[phase] = round((time.perf_counter() - start_s) * 1e3, 3)


@dataclass
class _Incoming:
    """What the target holds for one migration on its way."""

    offer: MigrationOffer
    reservation: handover.Reservation
    shm: kv_transfer.ShmKV | None


class Migrator:
    def __init__(self, nc, redis, worker_id: str, node: str, loop_thread, ensure_model, flush_chunks,
                 is_stopping):
        self.nc, self.redis = nc, redis
        self.worker_id, self.node = worker_id, node
        self.loop_thread = loop_thread
        self.ensure_model = ensure_model  # async (model_id) -> bool: registered with the engine
        self.flush_chunks = flush_chunks  # async (): every chunk made so far is on the bus
        self.is_stopping = is_stopping  # () -> bool: a draining worker takes nothing in
        self._incoming: dict[str, _Incoming] = {}
        self.num_moved_out = 0

    async def subscribe(self) -> None:
        wid = self.worker_id
        await natsutil.subscribe_typed(self.nc, subjects.worker_migrate(wid), MigrateCommand, self.on_migrate)
        await natsutil.subscribe_typed(self.nc, subjects.worker_migrate(wid, "offer"), MigrationOffer, self.on_offer)
        await natsutil.subscribe_typed(self.nc, subjects.worker_migrate(wid, "kv"), KVBlocks, self.on_kv)
        await natsutil.subscribe_typed(self.nc, subjects.worker_migrate(wid, "commit"), MigrationCommit,
                                       self.on_commit)
        await natsutil.subscribe_typed(self.nc, subjects.worker_migrate(wid, "cancel"), MigrationCancel,
                                       self.on_cancel)

    # -- source -------------------------------------------------------------------------
    async def on_migrate(self, cmd: MigrateCommand, msg: Msg) -> None:
        """c2c.worker.<id>.migrate (MigrateCommand) -> MigrationResult on msg.reply, if any."""
        result = await self.migrate(cmd.request_id, cmd.target_worker_id, cmd.transport)
        if msg.reply:
            await self.nc.publish(msg.reply, schemas.encode(result))

    async def drain(self, deadline_s: float) -> int:
        """Move every decoding request away (draining); returns how many moved. What stays
        is handed back for re-dispatch by the caller."""
        request_ids = [request_id for request_id, _, _ in self.loop_thread.unfinished()]
        rotated = set(await self.loop_thread.call(lambda lt: _bring_in(lt.engine, request_ids)))
        results = []
        for request_id in sorted(request_ids, key=lambda r: r in rotated):  # rotated ones last: copied back meanwhile
            if time.monotonic() >= deadline_s:
                break
            if request_id in rotated:
                await self._await_back_in(request_id, deadline_s)
            results.append(await self.migrate(request_id))
        return sum(r.is_moved for r in results)

    async def _await_back_in(self, request_id: str, deadline_s: float) -> None:
        """Until a request rotated out (asked back in by `_bring_in`) decodes again, at a step
        boundary, or the deadline passes (then `migrate` reports it not movable)."""
        while time.monotonic() < deadline_s:
            if await self.loop_thread.call(lambda lt: _is_back_in(lt.engine, request_id)):
                return
            await asyncio.sleep(0.005)

    async def migrate(self, request_id: str, target_id: str = "", transport: str = "") -> MigrationResult:
        """Move one running request ("": the one with the most tokens to go that a target can
        take); never raises (the result says what happened)."""
        start_s = time.perf_counter()
        try:
            workers = await natsutil.live_workers(self.redis)
            request_id = request_id or await self._pick_request(workers, target_id)
            model_id, num_tokens, max_tokens, layout, block_size = await self.loop_thread.call(
                lambda lt: _describe(lt.engine, request_id))
            targets = self._targets(workers, model_id, target_id)
            errors = []
            for target in targets:
                out = _Outgoing(uuid.uuid4().hex[:16], request_id, model_id, target.worker_id,
                                transport_for(transport, self.node, target.node), layout, block_size)
                try:
                    await self._migrate_to(out, num_tokens, max_tokens)
                except MigrationFailed as exc:
                    errors.append(f"{target.worker_id}: {exc}")
                    continue
                self.num_moved_out += 1
                total_ms = (time.perf_counter() - start_s) * 1e3
                stop_ms = out.phases_ms["detach"] + out.phases_ms["flush"] + out.phases_ms["commit"]
                log.info("[req=%s] moved to %s by %s in %.1f ms (stopped %.1f ms)", request_id, out.target_id,
                         out.transport, total_ms, stop_ms)
                return MigrationResult(request_id, True, out.target_id, out.transport, total_ms=total_ms,
                                       stop_ms=stop_ms, phases_ms=out.phases_ms)
            raise MigrationFailed("; ".join(errors) or "no other live worker serves the model")
        except (MigrationFailed, handover.HandoverError, *natsutil.IO_ERRORS) as exc:
            log.info("[req=%s] not moved: %s", request_id, exc)
            return MigrationResult(request_id, error=str(exc))

    def _targets(self, workers: list, model_id: str, target_id: str) -> list:
        ranked = rank_targets(workers, model_id, self.worker_id, self.node)
        return [w for w in ranked if w.worker_id == target_id] if target_id else ranked

    async def _pick_request(self, workers: list, target_id: str) -> str:
        movable = await self.loop_thread.call(_movable)
        for request_id, model_id in movable:
            if self._targets(workers, model_id, target_id):
                return request_id
        raise MigrationFailed(f"none of the {len(movable)} decoding requests here can go to {target_id or 'another worker'}")

    async def _migrate_to(self, out: _Outgoing, num_tokens: int, max_tokens: int) -> None:
        """Offer, pre-copy, stop-and-copy (each phase timed in out.phases_ms)."""
        num_shm_blocks = num_blocks_for(max_tokens, out.block_size)
        if out.transport == "shm":
            out.shm = kv_transfer.ShmKV(out.migration_id, out.kv_layout, num_shm_blocks,
                                        self.loop_thread.engine.runner.kv_dtype, create=True)
        try:
            with out.timed("offer"):
                await self._ask(out.target_id, "offer", MigrationOffer(
                    out.migration_id, out.request_id, out.model_id, self.worker_id, num_tokens, out.kv_layout,
                    out.transport, num_shm_blocks if out.shm else 0), OFFER_TIMEOUT_S)
            try:
                with out.timed("precopy"):
                    await self._precopy(out)
                await self._stop_and_copy(out)
            except (MigrationFailed, handover.HandoverError):  # (the request may have ended meanwhile)
                await self.nc.publish(subjects.worker_migrate(out.target_id, "cancel"),
                                      schemas.encode(MigrationCancel(out.migration_id)))
                raise
        finally:
            if out.shm is not None:
                out.shm.unlink()

    async def _precopy(self, out: _Outgoing) -> None:
        """The full blocks, read while the request keeps decoding (no step writes them)."""
        block_ids, out.num_preemptions = await self.loop_thread.call(lambda lt: _full_blocks(lt.engine, out))
        runner = self.loop_thread.engine.runner
        k, v = await asyncio.to_thread(runner.export_kv, out.model_id, block_ids)
        if out.shm is not None:  # a big copy: off the event loop, which publishes this worker's chunks
            await asyncio.to_thread(out.shm.write, 0, k, v)
        for message in _kv_messages(out, 0, k, v, self.nc.max_payload):
            await self._ask(out.target_id, "kv", message, STEP_TIMEOUT_S)
        out.num_sent_blocks = len(block_ids)

    async def _stop_and_copy(self, out: _Outgoing) -> None:
        with out.timed("detach"):
            state, parked, info, tail = await self.loop_thread.call(lambda lt: _detach(lt, out))
        commit = MigrationCommit(out.migration_id, state, tail, info.reply, info.epoch, info.num_chunks,
                                 info.arrival_s, info.num_resumed, info.num_skip_chars, info.ttft_slo_ms,
                                 info.tpot_slo_ms)
        try:
            with out.timed("flush"):
                await self.flush_chunks()  # its last chunk from here goes before the target's first
            with out.timed("commit"):
                reply = await self._ask(out.target_id, "commit", commit, STEP_TIMEOUT_S)
            out.phases_ms["resume_at_target"] = reply.work_ms
        except MigrationFailed:
            await self.loop_thread.call(lambda lt: _reattach(lt, out.request_id, parked, info))
            raise
        await self.loop_thread.call(lambda lt: handover.release(lt.engine, parked))

    async def _ask(self, target_id: str, step: str, message, timeout_s: float) -> MigrationReply:
        """Request/reply to the target; MigrationFailed unless it answers yes in time."""
        try:
            msg = await self.nc.request(subjects.worker_migrate(target_id, step), schemas.encode(message),
                                        timeout=timeout_s)
            reply = schemas.decode(MigrationReply, msg.data)
        except (TimeoutError, msgspec.ValidationError, msgspec.DecodeError, *natsutil.IO_ERRORS) as exc:
            raise MigrationFailed(f"{step}: {type(exc).__name__} {exc}") from exc
        if not reply.is_ok:
            raise MigrationFailed(f"{step} refused: {reply.error}")
        return reply

    # -- target -------------------------------------------------------------------------
    async def on_offer(self, offer: MigrationOffer, msg: Msg) -> None:
        """c2c.worker.<id>.migrate_offer (MigrationOffer) -> MigrationReply: blocks reserved or why not."""
        try:
            if self.is_stopping():
                raise handover.HandoverError(f"worker {self.worker_id} is stopping")
            if not await self.ensure_model(offer.model_id):
                raise handover.HandoverError(f"model {offer.model_id} is not in the catalog")
            reservation = await self.loop_thread.call(lambda lt: handover.reserve(
                lt.engine, offer.migration_id, offer.model_id, offer.num_tokens, offer.kv_layout))
            shm = None
            if offer.transport == "shm":
                try:
                    shm = kv_transfer.ShmKV(offer.migration_id, offer.kv_layout, offer.shm_num_blocks,
                                            self.loop_thread.engine.runner.kv_dtype, create=False)
                except (OSError, ValueError):
                    await self.loop_thread.call(lambda lt: handover.cancel(lt.engine, reservation))
                    raise
            self._incoming[offer.migration_id] = _Incoming(offer, reservation, shm)
            await self._reply(msg, MigrationReply(True))
        except (handover.HandoverError, OSError, ValueError, *natsutil.IO_ERRORS) as exc:
            log.info("[req=%s] migration offer from %s refused: %s", offer.request_id, offer.source_worker_id, exc)
            await self._reply(msg, MigrationReply(False, str(exc)))

    async def on_kv(self, blocks: KVBlocks, msg: Msg) -> None:
        """c2c.worker.<id>.migrate_kv (KVBlocks) -> MigrationReply: the blocks are in place."""
        incoming = self._incoming.get(blocks.migration_id)
        if incoming is None:
            await self._reply(msg, MigrationReply(False, "no such migration here (cancelled or stale)"))
            return
        try:
            end_tokens = (blocks.first_block + blocks.num_blocks) * incoming.offer.kv_layout[1]
            await self.loop_thread.call(lambda lt: handover.grow(lt.engine, incoming.reservation, end_tokens))
            await asyncio.to_thread(_import, self.loop_thread.engine, incoming, blocks)
            await self._reply(msg, MigrationReply(True))
        except (handover.HandoverError, ValueError, RuntimeError) as exc:
            await self._reply(msg, MigrationReply(False, str(exc)))

    async def on_commit(self, commit: MigrationCommit, msg: Msg) -> None:
        """c2c.worker.<id>.migrate_commit (MigrationCommit) -> MigrationReply: the request runs here."""
        incoming = self._incoming.pop(commit.migration_id, None)
        if incoming is None:
            await self._reply(msg, MigrationReply(False, "no such migration here (cancelled or stale)"))
            return
        start_s = time.perf_counter()
        try:
            await self.loop_thread.call(lambda lt: _resume(lt, incoming, commit))
        except (handover.HandoverError, ValueError, RuntimeError) as exc:
            log.warning("[req=%s] migration commit failed: %s", commit.request.request_id, exc)
            await self._reply(msg, MigrationReply(False, str(exc)))
            return
        work_ms = (time.perf_counter() - start_s) * 1e3
        log.info("[req=%s] moved here from %s (%d tokens, %s; resumed in %.1f ms)", commit.request.request_id,
                 incoming.offer.source_worker_id, len(commit.request.token_ids), incoming.offer.transport, work_ms)
        await self._reply(msg, MigrationReply(True, work_ms=work_ms))

    async def on_cancel(self, cancel: MigrationCancel, msg: Msg) -> None:
        """c2c.worker.<id>.migrate_cancel (MigrationCancel): give the reserved blocks back."""
        incoming = self._incoming.pop(cancel.migration_id, None)
        if incoming is not None:
            await self.loop_thread.call(lambda lt: handover.cancel(lt.engine, incoming.reservation))

    async def drop_stale(self) -> None:
        """Free reservations whose source went quiet (it died mid-way)."""
        now_s = time.monotonic()
        for migration_id, incoming in list(self._incoming.items()):
            if now_s - incoming.reservation.last_active_s > _STALE_S:
                log.warning("migration %s from %s went quiet: reservation freed", migration_id,
                            incoming.offer.source_worker_id)
                del self._incoming[migration_id]
                await self.loop_thread.call(lambda lt, r=incoming.reservation: handover.cancel(lt.engine, r))

    async def _reply(self, msg: Msg, reply: MigrationReply) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, schemas.encode(reply))


# -- engine thread (through EngineLoop.call) ---------------------------------------------
def _describe(engine, request_id: str) -> tuple[str, int, int, list[int], int]:
    """(model, KV tokens now, most tokens it may reach, KV layout, block size) of a request
    that can move now; HandoverError otherwise."""
    seq = handover.check_movable(engine, request_id)
    max_tokens = seq.num_prompt_tokens + seq.params.max_tokens
    return (seq.model_id, seq.num_computed_tokens, max_tokens, engine.runner.kv_layout(seq.model_id),
            engine.config.block_size)


def _bring_in(engine, request_ids: list[str]) -> list[str]:
    """Ask the rotator to bring these requests' KV back from the host tier first and to keep
    them in (a drain moves them next); returns those that are rotated out now."""
    rotator = engine.scheduler.rotator
    if rotator is None:
        return []
    rotated = {r.seq.request_id for r in rotator.rotations}
    wanted = [r for r in request_ids if r in rotated]
    rotator.wanted_in.update(request_ids)
    return wanted


def _is_back_in(engine, request_id: str) -> bool:
    req = engine._requests.get(request_id)
    return req is None or req.seq.is_finished or req.seq.status == SequenceStatus.RUNNING


def _movable(loop_thread) -> list[tuple[str, str]]:
    """(request id, model) of the requests that can move now, the most tokens to go first."""
    found = []
    for request_id, _, _ in loop_thread.unfinished():
        try:
            seq = handover.check_movable(loop_thread.engine, request_id)
        except handover.HandoverError:
            continue
        found.append((seq.params.max_tokens - seq.num_generated, request_id, seq.model_id))
    return [(request_id, model_id) for _, request_id, model_id in sorted(found, reverse=True)]


def _full_blocks(engine, out: _Outgoing) -> tuple[list[int], int]:
    seq = handover.check_movable(engine, out.request_id)
    return handover.computed_block_ids(seq, out.block_size, full_only=True), seq.num_preemptions


def _detach(loop_thread, out: _Outgoing):
    """Stop the request between steps: (state, parked, chunk state, the tail of its KV)."""
    engine = loop_thread.engine
    handover.check_movable(engine, out.request_id)
    info = loop_thread.take_inflight(out.request_id)
    if info is None:
        raise handover.HandoverError(f"request {out.request_id} has no stream here")
    state, parked = handover.detach(engine, out.request_id)
    first = out.num_sent_blocks if parked.num_preemptions == out.num_preemptions else 0  # recomputed: all again
    block_ids = handover.computed_block_ids(parked.seq, out.block_size, full_only=False)[first:]
    k, v = engine.runner.export_kv(out.model_id, block_ids)
    tail = KVBlocks(out.migration_id, first, len(block_ids))
    if out.shm is not None:
        out.shm.write(first, k, v)
    else:
        tail.k, tail.v = kv_transfer.to_bytes(k), kv_transfer.to_bytes(v)
    return state, parked, info, tail


def _reattach(loop_thread, request_id: str, parked: handover.Parked, info) -> None:
    handover.reattach(loop_thread.engine, parked)
    loop_thread.restore_inflight(request_id, info)


def _resume(loop_thread, incoming: _Incoming, commit: MigrationCommit) -> None:
    engine, reservation = loop_thread.engine, incoming.reservation
    try:
        handover.grow(engine, reservation, len(commit.request.token_ids) - 1)
        _import(engine, incoming, commit.tail)
        handover.attach(engine, commit.request, reservation)
    except Exception:
        handover.cancel(engine, reservation)
        raise
    loop_thread.adopt(commit, incoming.offer.source_worker_id)


def _import(engine, incoming: _Incoming, blocks: KVBlocks) -> None:
    """Copy blocks first_block.. (from the shared file or the message) into the reserved ones."""
    if not blocks.num_blocks:
        return
    layout, dtype = incoming.offer.kv_layout, engine.runner.kv_dtype
    if incoming.shm is not None:
        k, v = incoming.shm.read(blocks.first_block, blocks.num_blocks)
    else:
        k, v = kv_transfer.from_bytes(blocks.k, layout, dtype), kv_transfer.from_bytes(blocks.v, layout, dtype)
    block_ids = incoming.reservation.block_table[blocks.first_block:blocks.first_block + blocks.num_blocks]
    engine.runner.import_kv(incoming.offer.model_id, block_ids, k, v)


def _kv_messages(out: _Outgoing, first_block: int, k, v, max_payload_bytes: int):
    """KVBlocks messages for blocks first_block.. (shm: already in the file; the range only)."""
    num_blocks = int(k.shape[1])
    if out.shm is not None:
        yield KVBlocks(out.migration_id, first_block, num_blocks)
        return
    step = kv_transfer.blocks_per_message(out.kv_layout, max_payload_bytes)
    for lo in range(0, num_blocks, step):
        hi = min(num_blocks, lo + step)
        yield KVBlocks(out.migration_id, first_block + lo, hi - lo, kv_transfer.to_bytes(k[:, lo:hi]),
                       kv_transfer.to_bytes(v[:, lo:hi]))
