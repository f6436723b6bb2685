"""Continuous batching over several models (pure: no torch).

Each step runs one model's batch (the model is chosen by `step_policy.pick_model`).
Within it, running sequences are taken in deadline order (`step_policy.deadline_s`:
decode tokens and unfinished prefill chunks), then waiting ones in weighted fair order
by tenant (`step_policy.fair_order`: deadline order within a tenant, and among tenants the
one with the fewest running sequences first), under a token budget
(`max_num_batched_tokens`), a sequence cap (`max_num_seqs`) and a prefill chunk
(`chunk_size`). Prefill chunks and decode tokens share one batch. When a model's KV cache
runs out, a running sequence is preempted (`step_policy.pick_victim`: the latest deadline of
the tenant holding the most): its blocks are freed and it is recomputed later (prompt +
generated tokens). With a host KV tier (`rotator`, `worker/rotation.py`), running sequences
with SLO slack rotate their KV out to host memory and back instead, decided once per step
before the batch is chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.knobs import DEFAULT_KNOBS
from worker import step_policy
from worker.block_manager import BlockManager
from worker.rotation import Rotator
from worker.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = DEFAULT_KNOBS.max_num_seqs
    max_num_batched_tokens: int = DEFAULT_KNOBS.max_num_batched_tokens
    chunk_size: int = DEFAULT_KNOBS.chunk_size


@dataclass
class ScheduledBatch:
    """One step's work: `num_new_tokens[i]` tokens of `seqs[i]`, all of one model."""

    model_id: str
    seqs: list[Sequence]
    num_new_tokens: list[int]
    sample_flags: list[bool] = field(default_factory=list)  # seq gets a new token this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_sampled(self) -> int:
        return sum(self.sample_flags)


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None, clock: Callable[[], float] = time.time):
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.block_managers: dict[str, BlockManager] = {}
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.current_model: str | None = None
        self.num_preemptions = 0
        self.num_shared_prefix_tokens = 0  # prompt tokens whose KV a sequence took from another
        self.tenant_to_weight: dict[str, float] = {}  # fair-share weights (absent: 1)
        self.rotator: Rotator | None = None  # KV rotation to a host tier (None: recompute only)
        self.step_s = 0.05  # recent step time (the engine measures it): the rotation policy's clock

    # -- models and requests ------------------------------------------------------------
    def add_model(self, model_id: str, num_blocks: int, block_size: int) -> None:
        self.block_managers[model_id] = BlockManager(num_blocks, block_size)

    def add(self, seq: Sequence) -> None:
        if seq.model_id not in self.block_managers:
            raise KeyError(f"model {seq.model_id!r} has no KV cache in the scheduler")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._rotated())

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running + self.waiting + self._rotated():
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove `seq` from the queues, free its KV blocks, mark it finished."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self._rotated():
            self.rotator.drop(seq, self.block_managers[seq.model_id])
        self.block_managers[seq.model_id].free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def seqs_of(self, model_id: str) -> list[Sequence]:
        return [s for s in self.running + self.waiting + self._rotated() if s.model_id == model_id]

    def recompute(self, model_id: str) -> None:
        """Preempt every running sequence of the model (its KV cache was lost: a pipeline
        stage died); each is recomputed, prompt and generated tokens, on a later step."""
        for seq in [s for s in self.running if s.model_id == model_id]:
            self._preempt(seq, self.block_managers[model_id])

    def is_model_busy(self, model_id: str) -> bool:
        """Some sequence of the model holds KV blocks (its weights must stay)."""
        return any(s.model_id == model_id for s in self.running + self._rotated())

    # -- one step -------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Pick the step's model and its batch; None when there is nothing to run."""
        if not self.has_work():
            return None
        now_s = self.clock()
        if self.rotator is not None:
            self.rotator.step(self, now_s)
        first = self._pick_model(now_s)
        if first is not None:
            batch = self._schedule_model(first, now_s)
            if batch.seqs:
                self.current_model = first
                return batch
        for model_id in self._models_by_deadline(now_s):  # the picked model could not run
            batch = self._schedule_model(model_id, now_s) if model_id != first else None
            if batch is not None and batch.seqs:
                self.current_model = model_id
                return batch
        return None

    def postprocess(self, batch: ScheduledBatch, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance KV counts, append sampled tokens; returns the sequences given a token.

        A sequence finished during the step (its sample failed) is skipped: its token
        (one per sample flag, as always) is dropped and its blocks are already free.
        """
        now_s = self.clock()
        tokens = iter(sampled_token_ids)
        updated = []
        for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.sample_flags, strict=True):
            token_id = next(tokens) if samples else None
            if seq.is_finished:
                continue
            seq.num_computed_tokens += num_new
            if samples:
                seq.token_ids.append(token_id)
                if seq.first_token_s is None:
                    seq.first_token_s = now_s
                seq.last_token_s = now_s
                updated.append(seq)
        return updated

    def observe_step(self, step_s: float) -> None:
        """The engine's last step took step_s (smoothed: the rotation policy's time estimates)."""
        self.step_s = 0.8 * self.step_s + 0.2 * step_s

    # -- internals ------------------------------------------------------------------------
    def _rotated(self) -> list[Sequence]:
        return self.rotator.seqs() if self.rotator is not None else []

    def _schedule_model(self, model_id: str, now_s: float) -> ScheduledBatch:
        cfg = self.config
        block_manager = self.block_managers[model_id]
        batch = ScheduledBatch(model_id, [], [])
        budget = cfg.max_num_batched_tokens
        candidates = sorted((s for s in self.running if s.model_id == model_id), key=self._deadline)
        for seq in candidates:
            if len(batch.seqs) >= cfg.max_num_seqs or budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, cfg.chunk_size, budget)
            if self._make_room(seq, num_new, candidates, batch, block_manager):
                budget -= self._take(batch, seq, num_new, block_manager)
        for seq in self._fair_order([s for s in self.waiting if s.model_id == model_id]):
            if len(batch.seqs) >= cfg.max_num_seqs or budget <= 0:
                break
            if not self._share_prefix(seq, block_manager):
                continue  # a sibling is computing the prefix this one would share: wait for it
            num_new = min(seq.num_uncomputed_tokens, cfg.chunk_size, budget)
            if not block_manager.can_allocate(seq, seq.num_computed_tokens + num_new):
                self._unshare(seq, block_manager)  # a waiting sequence holds no KV
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            budget -= self._take(batch, seq, num_new, block_manager)
        return batch

    def _share_prefix(self, seq: Sequence, bm: BlockManager) -> bool:
        """Before a waiting sequence with no KV starts, take the full blocks of the longest
        prefix it has in common with a running sequence of its model (the n samples of a
        request, a shared system prompt) instead of computing them again. False: a running
        sibling is still computing that prefix, so this one waits a step rather than
        computing it twice."""
        if seq.num_computed_tokens or seq.block_table:
            return True
        block_size = bm.block_size
        max_blocks = (seq.num_tokens - 1) // block_size  # the last token is always computed: it gets the logits
        if max_blocks == 0:
            return True
        best, best_blocks, is_pending = None, 0, False
        for donor in self.running:
            if donor.model_id != seq.model_id or donor.status != SequenceStatus.RUNNING:
                continue
            num_blocks = _common_blocks(seq.token_ids, donor.token_ids, block_size, max_blocks)
            if num_blocks <= best_blocks:
                continue
            if donor.num_computed_tokens >= num_blocks * block_size and len(donor.block_table) >= num_blocks:
                best, best_blocks = donor, num_blocks
            else:
                is_pending = True
        if best is not None:
            bm.share(seq, best.block_table[:best_blocks])
            seq.num_computed_tokens = best_blocks * block_size
            self.num_shared_prefix_tokens += seq.num_computed_tokens
            return True
        return not is_pending

    def _unshare(self, seq: Sequence, bm: BlockManager) -> None:
        if seq.block_table:
            self.num_shared_prefix_tokens -= seq.num_computed_tokens
            bm.free(seq)
            seq.num_computed_tokens = 0

    def _take(self, batch: ScheduledBatch, seq: Sequence, num_new: int, bm: BlockManager) -> int:
        bm.allocate(seq, seq.num_computed_tokens + num_new)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(num_new)
        batch.sample_flags.append(seq.num_computed_tokens + num_new == seq.num_tokens)
        return num_new

    def _make_room(self, seq, num_new, candidates, batch, bm: BlockManager) -> bool:
        """Preempt the latest-deadline unscheduled sequences until `seq` fits; False if it was one.
        With a host tier, the victim with the most slack rotates out instead, if it can
        afford it and the tier holds it; its blocks free once the copy is done, so `seq`
        waits a step for them (and waits rather than rotate itself out)."""
        while not bm.can_allocate(seq, seq.num_computed_tokens + num_new):
            if seq.status != SequenceStatus.RUNNING or self._is_room_coming(seq, num_new, bm):
                return False
            victims = [s for s in candidates if s.status == SequenceStatus.RUNNING and s not in batch.seqs]
            if self.rotator is not None:
                others = [s for s in victims if s is not seq]
                if self.rotator.rotate_out_victim(self, others, self.clock()):
                    continue
                if not others:
                    return False  # no one to make room: wait a step, keeping its KV
            victim = self._pick_victim(victims)  # seq itself is always among them
            self._preempt(victim, bm)
            if victim is seq:
                return False
        return True

    def _is_room_coming(self, seq: Sequence, num_new: int, bm: BlockManager) -> bool:
        """Swap-outs in flight free the blocks `seq` lacks (then they are promised to it)."""
        if self.rotator is None:
            return False
        num_missing = bm.num_missing_blocks(seq, seq.num_computed_tokens + num_new)
        if self.rotator.num_pending_free_blocks(seq.model_id) < num_missing - bm.num_free_blocks:
            return False
        self.rotator.promise(seq.model_id, num_missing)
        return True

    def _preempt(self, seq: Sequence, bm: BlockManager) -> None:
        bm.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.append(seq)

    def _view(self, seq: Sequence):
        return step_policy.SeqView(
            request_id=seq.request_id,
            model_id=seq.model_id,
            arrival_s=seq.arrival_s,
            is_prefill=seq.is_prefill,
            num_generated=seq.num_generated,
            last_token_s=seq.last_token_s,
            ttft_slo_s=seq.ttft_slo_s,
            tpot_slo_s=seq.tpot_slo_s,
            tenant=seq.tenant,
        )

    def _deadline(self, seq: Sequence) -> float:
        return step_policy.deadline_s(self._view(seq))

    def _num_running_by_tenant(self) -> dict[str, int]:
        return step_policy.num_running_by_tenant([self._view(s) for s in self.running])

    def _fair_order(self, waiting: list[Sequence]) -> list[Sequence]:
        by_id = {s.request_id: s for s in waiting}
        views = step_policy.fair_order([self._view(s) for s in waiting], self._num_running_by_tenant(),
                                       self.tenant_to_weight)
        return [by_id[v.request_id] for v in views]

    def _pick_victim(self, victims: list[Sequence]) -> Sequence:
        by_id = {s.request_id: s for s in victims}
        view = step_policy.pick_victim([self._view(s) for s in victims], self._num_running_by_tenant(),
                                       self.tenant_to_weight)
        return by_id[view.request_id]

    def _pick_model(self, now_s: float) -> str | None:
        views = [self._view(s) for s in self.running + self.waiting]
        return step_policy.pick_model(views, now_s, self.current_model)

    def _models_by_deadline(self, now_s: float) -> list[str]:
        seen: dict[str, None] = {}
        for seq in sorted(self.running + self.waiting, key=self._deadline):
            seen.setdefault(seq.model_id, None)
        return list(seen)

    # -- stats ----------------------------------------------------------------------------
    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens admitted or waiting that are not in the KV cache yet (a decoding
        sequence's one uncomputed token is decode work, not prefill)."""
        waiting = sum(s.num_uncomputed_tokens for s in self.waiting)
        return waiting + sum(s.num_uncomputed_tokens - (1 if s.num_generated else 0) for s in self.running)

    def model_stats(self, model_id: str) -> tuple[int, int, float]:
        """(num_running, num_waiting, kv_used_frac) of one model."""
        num_running = sum(1 for s in self.running + self._rotated() if s.model_id == model_id)
        num_waiting = sum(1 for s in self.waiting if s.model_id == model_id)
        return num_running, num_waiting, self.block_managers[model_id].used_frac


def _common_blocks(a: list[int], b: list[int], block_size: int, max_blocks: int) -> int:
    """How many leading full blocks of tokens `a` and `b` have in common (at most max_blocks)."""
    num_blocks = 0
    while num_blocks < max_blocks:
        start = num_blocks * block_size
        if a[start : start + block_size] != b[start : start + block_size]:
            break
        num_blocks += 1
    return num_blocks
