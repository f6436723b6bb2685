"""Where a migrating request goes, and by which path (pure: no I/O)."""

from __future__ import annotations

from services.schemas import WorkerInfo


def rank_targets(workers: list[WorkerInfo], model_id: str, source_id: str, source_node: str) -> list[WorkerInfo]:
    """The live workers that may take a request of `model_id`, best first: not the source,
    not pinned to other models; same node first (its KV goes through shared memory)."""
    fits = [w for w in workers if w.worker_id != source_id and (not w.pinned_models or model_id in w.pinned_models)]
    return sorted(fits, key=lambda w: (w.node != source_node, w.worker_id))


def transport_for(requested: str, source_node: str, target_node: str) -> str:
    """"shm" between two workers of one node unless "net" was asked; "net" across nodes."""
    if requested == "net" or source_node != target_node:
        return "net"
    return "shm"
