"""Placer policy: which slice serves a request (pure: no NATS, Redis or torch).

Used live by `placer/service.py` and by the cluster simulator (`sim/`). Routing scores
every slice that may serve the model and has room; the best score wins:

    score = w_cache * cached_fraction(model)        # weights already near the compute
          + w_served * (model already mapped/served) # no cold map at all
          - w_queue * queue_load                    # (running + waiting) / max_num_seqs
          - w_kv * (1 - kv_free_frac)               # KV pressure
          - w_link * link_pressure * host_fraction  # host bytes must cross a busy link

An interactive request weighs queueing and link contention more (TTFT is what it
feels); a batch request weighs cache affinity more (throughput is what it feels).
Prewarm planning (`DemandForecaster`, `plan_prewarm`) is below the routing code.
"""

from __future__ import annotations

from dataclasses import dataclass

# A slice takes new requests until running + waiting reaches this many batches' worth.
QUEUE_CAP_FACTOR = 4


@dataclass
class SliceView:
    worker_id: str
    node: str
    gpu: str  # link domain: slices of one GPU (or one CPU node) share a link
    backend: str  # "cuda" | "cpu"
    models: frozenset[str]  # models this slice can serve now (mapped / served)
    cached_fraction: dict[str, float]  # model -> fraction of weights cached on slice (rho)
    num_running: int
    num_waiting: int
    max_num_seqs: int
    kv_free_frac: float
    link_util: float  # 0..1 of its link domain's capacity, from telemetry
    pinned_models: frozenset[str] = frozenset()  # "dedicated" mode: only these
    link_demand_gbps: float = 0.0  # optional: streaming demand of co-located slices
    link_capacity_gbps: float = 0.0  # optional: capacity of the link domain (0 = unknown)


@dataclass
class RequestView:
    request_id: str
    model_id: str
    num_prompt_tokens: int  # estimate (chars / 4 when not tokenized)
    slo_class: str = "standard"  # "interactive" | "standard" | "batch"


@dataclass(frozen=True)
class RouteWeights:
    """Weights of the routing score for one SLO class."""

    cache: float = 1.0
    served: float = 0.5
    queue: float = 1.0
    kv: float = 0.5
    link: float = 1.0


SLO_CLASS_WEIGHTS: dict[str, RouteWeights] = {
    "interactive": RouteWeights(cache=1.0, served=0.5, queue=2.0, kv=0.5, link=2.0),
    "standard": RouteWeights(),
    "batch": RouteWeights(cache=2.0, served=1.0, queue=0.5, kv=0.5, link=0.5),
}


def can_serve(slice_view: SliceView, model_id: str) -> bool:
    """A pinned slice serves only its pinned models; any other slice serves any model."""
    return not slice_view.pinned_models or model_id in slice_view.pinned_models


def has_capacity(slice_view: SliceView) -> bool:
    """True while the slice's queue is below QUEUE_CAP_FACTOR batches."""
    num_queued = slice_view.num_running + slice_view.num_waiting
    return num_queued < QUEUE_CAP_FACTOR * max(1, slice_view.max_num_seqs)


def link_pressure(slice_view: SliceView) -> float:
    """How oversubscribed the slice's link is, 0 (idle) .. >1 (demand past capacity)."""
    if slice_view.link_capacity_gbps > 0 and slice_view.link_demand_gbps > 0:
        return slice_view.link_demand_gbps / slice_view.link_capacity_gbps
    return max(0.0, slice_view.link_util)


def route_score(req: RequestView, slice_view: SliceView) -> float:
    """Higher is better. See the module docstring for the terms."""
    weights = SLO_CLASS_WEIGHTS.get(req.slo_class, SLO_CLASS_WEIGHTS["standard"])
    rho = min(1.0, max(0.0, slice_view.cached_fraction.get(req.model_id, 0.0)))
    is_served = req.model_id in slice_view.models
    queue_load = (slice_view.num_running + slice_view.num_waiting) / max(1, slice_view.max_num_seqs)
    kv_load = 1.0 - min(1.0, max(0.0, slice_view.kv_free_frac))
    # Only the uncached part of the weights crosses the link.
    link_cost = link_pressure(slice_view) * (1.0 - rho)
    return (
        weights.cache * rho
        + weights.served * float(is_served)
        - weights.queue * queue_load
        - weights.kv * kv_load
        - weights.link * link_cost
    )


def choose_slice(req: RequestView, slices: list[SliceView]) -> str | None:
    """The worker_id of the best slice for `req`, or None when none can take it.

    None means: no slice may serve the model (all pinned to others) or every slice that
    may is full; the caller answers 503 (NoCapacity). Ties go to the first slice listed.
    """
    best_id: str | None = None
    best_score = float("-inf")
    for slice_view in slices:
        if not can_serve(slice_view, req.model_id) or not has_capacity(slice_view):
            continue
        score = route_score(req, slice_view)
        if score > best_score:
            best_id, best_score = slice_view.worker_id, score
    return best_id


__all__ = [
    "QUEUE_CAP_FACTOR",
    "RequestView",
    "RouteWeights",
    "SLO_CLASS_WEIGHTS",
    "SliceView",
    "can_serve",
    "choose_slice",
    "has_capacity",
    "link_pressure",
    "route_score",
]
