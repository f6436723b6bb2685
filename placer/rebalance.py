"""Rebalancing by live migration (pure: no I/O): when a slice is hot and another idle,
move a running request from the hot one to the idle one with its KV.

Hot: it decodes at least `min_running` requests and some wait behind them (or its KV cache
is nearly full), so a new token there waits for the others; idle: nothing running or
waiting. Each hot slice (most waiting first) is paired with one idle slice that serves a
model it runs, on its own node first (shared memory moves the KV); the source picks the
request itself (`MigrateCommand.request_id == ""`: the one with the most tokens to go that
the target can take). The views are the placer's live ones (stopping workers are not among
them). Off unless `C2C_REBALANCE_INTERVAL_S` > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.schemas import WorkerState

MIN_RUNNING = 2
KV_FULL_FRAC = 0.9


@dataclass(frozen=True)
class Move:
    source_id: str
    target_id: str


def is_hot(view: WorkerState, min_running: int = MIN_RUNNING) -> bool:
    return view.num_running >= min_running and (view.num_waiting > 0 or view.kv_free_frac < 1.0 - KV_FULL_FRAC)


def is_idle(view: WorkerState) -> bool:
    return view.num_running == 0 and view.num_waiting == 0


def can_serve(target: WorkerState, model_ids: list[str]) -> bool:
    return not target.pinned_models or any(m in target.pinned_models for m in model_ids)


def plan_moves(views: list[WorkerState], min_running: int = MIN_RUNNING) -> list[Move]:
    """At most one move per hot slice and per idle slice, hottest first."""
    hot = sorted((v for v in views if is_hot(v, min_running)), key=lambda v: (-v.num_waiting, v.worker_id))
    idle = [v for v in views if is_idle(v)]
    moves = []
    for source in hot:
        targets = [t for t in idle if can_serve(t, source.active_models or source.models)]
        if not targets:
            continue
        target = min(targets, key=lambda t: (t.node != source.node, t.worker_id))
        idle.remove(target)
        moves.append(Move(source.worker_id, target.worker_id))
    return moves
