"""KV rotation between a model's KV cache and the host tier: the scheduler's side (pure:
no torch; the copies are the `copier`'s, `worker.kv_tier.KVTier` in the engine).

Once per step, before the batch is chosen (`Rotator.step`), copies that completed take
effect, then `rotation_policy` decides what moves:

  RUNNING --swap-out starts--> ROTATING_OUT --copy done: device blocks freed--> ROTATED_OUT
  ROTATED_OUT --blocks allocated, swap-in starts--> ROTATING_IN --copy done--> RUNNING

A sequence in flight either way is in no batch, so the forward pass never writes the
blocks a copy reads, and a swapped-out sequence's blocks are reused only once their copy
is complete (a step later: the copy overlaps the step's compute). Its host blocks come
from a `BlockManager` of the tier's size. Recompute stays the fallback: victims the host
tier cannot hold are preempted as before, and so is a sequence whose copy failed. A model
without a host tier (no `add_model`) gets the same policy with recompute only (the
baseline `bench rotate` calls recompute_slo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from worker import rotation_policy as policy
from worker.block_manager import BlockManager, num_blocks_for
from worker.sequence import Sequence, SequenceStatus

_NO_HOST_LIMIT = 1 << 62


class TransferLike(Protocol):
    error: BaseException | None

    @property
    def is_done(self) -> bool: ...

    def wait(self, timeout_s: float | None = None) -> bool: ...


class Copier(Protocol):
    def start(self, model_id: str, direction: str, src_ids: list[int], dst_ids: list[int]) -> TransferLike: ...


@dataclass(eq=False)
class Rotation:
    seq: Sequence
    block_table: list[int] = field(default_factory=list)  # its blocks in the host tier
    transfer: TransferLike | None = None  # the copy in flight


class Rotator:
    def __init__(self, copier: Copier | None, config: policy.RotationConfig = policy.RotationConfig()):
        self.copier = copier
        self.config = config
        self.host_block_managers: dict[str, BlockManager] = {}
        self.rotations: list[Rotation] = []
        self.num_swaps_out = 0  # completed copies, each way
        self.num_swaps_in = 0
        self.num_stalls = 0  # sequences back later than their slack allowed
        self.stall_s = 0.0   # by how long, summed
        self.wanted_in: set[str] = set()  # request ids to bring back first and keep in (a drain moves them)
        self.num_recomputes = 0  # victims preempted by recompute (tier full, or a failed copy)
        # free blocks a running or waiting sequence waits for (swap-outs were started for
        # it): rotations back in leave them alone, so blocks freed for one sequence do not
        # go to another; set each step by whoever still waits
        self.model_to_promised: dict[str, int] = {}

    def add_model(self, model_id: str, num_host_blocks: int, block_size: int) -> None:
        if num_host_blocks > 0:
            self.host_block_managers[model_id] = BlockManager(num_host_blocks, block_size)

    # -- queries --------------------------------------------------------------------------
    def seqs(self, model_id: str | None = None) -> list[Sequence]:
        return [r.seq for r in self.rotations if model_id in (None, r.seq.model_id)]

    def num_host_blocks_used(self) -> int:
        return sum(bm.num_blocks - bm.num_free_blocks for bm in self.host_block_managers.values())

    def num_pending_free_blocks(self, model_id: str) -> int:
        """Device blocks that swap-outs in flight free when they complete."""
        return sum(len(r.seq.block_table) for r in self.rotations
                   if r.seq.model_id == model_id and r.seq.status == SequenceStatus.ROTATING_OUT)

    def wait_any(self, timeout_s: float) -> None:
        """Block until one copy in flight completes (or timeout_s): the engine's idle wait
        when every sequence it could run is in flight."""
        pending = [r.transfer for r in self.rotations if r.transfer is not None and not r.transfer.is_done]
        if pending:
            pending[0].wait(timeout_s)

    # -- once per step --------------------------------------------------------------------
    def step(self, sched, now_s: float) -> None:
        """Apply completed copies, then rotate in and out by slack; `sched` is the
        `worker.scheduler.Scheduler` whose queues and block managers change."""
        self._complete(sched, now_s)
        for model_id in sched.block_managers:
            self._rotate_in(sched, model_id, now_s)
            self.model_to_promised.pop(model_id, None)
            self._rotate_out(sched, model_id, self.host_block_managers.get(model_id), now_s)

    def promise(self, model_id: str, num_blocks: int) -> None:
        """Keep `num_blocks` free blocks of the model from rotations back in, next step."""
        self.model_to_promised[model_id] = self.model_to_promised.get(model_id, 0) + num_blocks

    def drop(self, seq: Sequence, bm: BlockManager) -> None:
        """Forget a rotated sequence (abort, error): its copy is waited for (a swap-in
        writes blocks that must not be reused before), then both tiers' blocks freed."""
        rotation = next(r for r in self.rotations if r.seq is seq)
        if rotation.transfer is not None:
            rotation.transfer.wait()
        self.rotations.remove(rotation)
        self.host_block_managers[seq.model_id].free(rotation)
        bm.free(seq)

    # -- internals ------------------------------------------------------------------------
    def _complete(self, sched, now_s: float) -> None:
        for rotation in [r for r in self.rotations if r.transfer is not None and r.transfer.is_done]:
            seq, failed = rotation.seq, rotation.transfer.error is not None
            rotation.transfer = None
            bm = sched.block_managers[seq.model_id]
            if failed:
                self.drop(seq, bm)
                self._recompute(sched, seq)
            elif seq.status == SequenceStatus.ROTATING_OUT:
                bm.free(seq)
                seq.status = SequenceStatus.ROTATED_OUT
                self.num_swaps_out += 1
            else:
                self._back_in(sched, rotation, now_s)

    def _back_in(self, sched, rotation: Rotation, now_s: float) -> None:
        seq = rotation.seq
        self.rotations.remove(rotation)
        self.host_block_managers[seq.model_id].free(rotation)
        seq.status = SequenceStatus.RUNNING
        sched.running.append(seq)
        self.num_swaps_in += 1
        slack_s = _slack_s(seq, now_s)
        if slack_s < 0:
            self.num_stalls += 1
            self.stall_s -= slack_s

    def _rotate_in(self, sched, model_id: str, now_s: float) -> None:
        bm = sched.block_managers[model_id]
        out = [r for r in self.rotations if r.seq.model_id == model_id and r.seq.status == SequenceStatus.ROTATED_OUT]
        if not out:
            return
        by_id = {r.seq.request_id: r for r in out}
        views = [policy.DecodeView(r.seq.request_id, num_blocks_for(r.seq.num_tokens, bm.block_size),
                                   -float("inf") if r.seq.request_id in self.wanted_in else _slack_s(r.seq, now_s),
                                   _num_remaining(r.seq)) for r in out]
        num_waiting_blocks = sum(num_blocks_for(s.num_tokens + 1, bm.block_size)
                                 for s in sched.waiting if s.model_id == model_id)
        num_free = bm.num_free_blocks - self.model_to_promised.get(model_id, 0)
        for view in policy.pick_rotate_in(views, num_free, num_waiting_blocks, sched.step_s, self.config):
            rotation = by_id[view.request_id]
            bm.allocate(rotation.seq, rotation.seq.num_computed_tokens)
            rotation.seq.status = SequenceStatus.ROTATING_IN
            rotation.transfer = self.copier.start(model_id, "in", list(rotation.block_table),
                                                  list(rotation.seq.block_table))

    def _rotate_out(self, sched, model_id: str, host_bm: BlockManager | None, now_s: float) -> None:
        bm = sched.block_managers[model_id]
        waiting = [s for s in sched.waiting if s.model_id == model_id]
        if not waiting:
            return
        head = min(waiting, key=lambda s: s.arrival_s + s.ttft_slo_s)
        num_head_blocks = num_blocks_for(head.num_tokens + 1, bm.block_size) - len(head.block_table)
        num_lacking = num_head_blocks - bm.num_free_blocks
        if num_lacking <= 0:  # it fits (or waits for a batch slot, not for KV)
            return
        num_pending = self.num_pending_free_blocks(model_id)
        if num_pending >= num_lacking:  # its blocks are on their way
            self.promise(model_id, num_head_blocks)
            return
        num_needed = num_lacking - num_pending
        num_prefill_steps = -(-head.num_uncomputed_tokens // max(1, sched.config.chunk_size))
        head_view = policy.WaitingView(head.request_id, num_needed, head.arrival_s + head.ttft_slo_s,
                                       num_prefill_steps)
        running = [s for s in sched.running if s.model_id == model_id]
        views = [policy.DecodeView(s.request_id, len(s.block_table), _slack_s(s, now_s), _num_remaining(s))
                 for s in running]
        if not policy.ttft_at_risk(head_view, views, sched.step_s, now_s):
            return
        decodes = [v for v, s in zip(views, running, strict=True)
                   if _is_decoding(s) and s.request_id not in self.wanted_in]
        num_free_host = host_bm.num_free_blocks if host_bm is not None else 0
        victims = policy.pick_rotate_out(decodes, num_needed, num_free_host, sched.step_s, self.config)
        to_recompute = []
        if not victims:  # the tier holds too few for the whole set: rotate what fits, recompute the rest
            victims, to_recompute = policy.split_rotate_out(
                policy.pick_rotate_out(decodes, num_needed, _NO_HOST_LIMIT, sched.step_s, self.config),
                num_free_host if host_bm is not None else -1)
        by_id = {s.request_id: s for s in running}
        for view in victims:
            self._start_out(sched, by_id[view.request_id], host_bm)
        if victims:
            self.promise(model_id, num_head_blocks)
        for view in to_recompute:
            sched.running.remove(by_id[view.request_id])
            bm.free(by_id[view.request_id])
            self._recompute(sched, by_id[view.request_id])

    def rotate_out_victim(self, sched, victims: list[Sequence], now_s: float) -> bool:
        """A running sequence must grow and `victims` could make room: start rotating out
        the one with the most slack, if it can afford the time away and the host tier holds
        it. False: none can (the scheduler preempts one by recompute instead)."""
        host_bm = self.host_block_managers.get(victims[0].model_id) if victims else None
        with_kv = [s for s in victims if s.num_computed_tokens > 0 and s.request_id not in self.wanted_in]
        if host_bm is None or not with_kv:
            return False
        views = [policy.DecodeView(s.request_id, num_blocks_for(s.num_computed_tokens, host_bm.block_size),
                                   _slack_s(s, now_s), _num_remaining(s)) for s in with_kv]
        chosen = policy.pick_rotate_out(views, 1, host_bm.num_free_blocks, sched.step_s, self.config)
        if not chosen:
            return False
        self._start_out(sched, next(s for s in with_kv if s.request_id == chosen[0].request_id), host_bm)
        return True

    def _start_out(self, sched, seq: Sequence, host_bm: BlockManager) -> None:
        rotation = Rotation(seq)
        host_bm.allocate(rotation, seq.num_computed_tokens)
        sched.running.remove(seq)
        seq.status = SequenceStatus.ROTATING_OUT
        seq.num_preemptions += 1  # its blocks will be reused: a migration's pre-copy of them is stale
        num_blocks = len(rotation.block_table)  # the blocks of its computed tokens
        rotation.transfer = self.copier.start(seq.model_id, "out", seq.block_table[:num_blocks],
                                              list(rotation.block_table))
        self.rotations.append(rotation)

    def _recompute(self, sched, seq: Sequence) -> None:
        """Back to waiting with no KV (the sequence's blocks are already freed)."""
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        sched.waiting.append(seq)
        sched.num_preemptions += 1
        self.num_recomputes += 1


def _is_decoding(seq: Sequence) -> bool:
    return seq.status == SequenceStatus.RUNNING and seq.first_token_s is not None and not seq.is_prefill


def _slack_s(seq: Sequence, now_s: float) -> float:
    if seq.first_token_s is None:
        return seq.arrival_s + seq.ttft_slo_s - now_s
    return policy.tpot_slack_s(seq.first_token_s, seq.num_generated, seq.tpot_slo_s, now_s)


def _num_remaining(seq: Sequence) -> int:
    max_tokens = getattr(seq.params, "max_tokens", 0) or 0
    return max(1, max_tokens - seq.num_generated)
