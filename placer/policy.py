"""Placer policy: which slice serves a request (pure: no NATS, Redis or torch).

Used live by `placer/service.py` and by the cluster simulator (`sim/`). Routing scores
every slice that may serve the model and has room; the best score wins:

    score = w_cache * cached_fraction(model)        # weights already near the compute
          + w_served * (model has requests there, or none) # no extra step in anyone's cycle
          - w_queue * queue_load                    # (running + waiting) / max_num_seqs
          - w_kv * (1 - kv_free_frac)               # KV pressure
          - w_link * link_pressure * host_fraction  # host bytes must cross a busy link

An interactive request weighs queueing and link contention more (TTFT is what it
feels); a batch request weighs cache affinity more (throughput is what it feels).
A slice's state is the worker's own record (`services.schemas.WorkerState`), as its
telemetry carries it live and as the simulator fills it. Two filters: a slice takes a
model it does not run only if its step cycle plus the model's step stays within the
TPOT SLO (`fits_cycle`), and only if its queued prefill work leaves room in the TTFT
SLO (`fits_ttft`).

Prewarm planning (`DemandForecaster`, `plan_prewarm`) is below the routing code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.schemas import WorkerState

# A slice takes new requests until running + waiting reaches this many batches' worth.
QUEUE_CAP_FACTOR = 4


@dataclass
class RequestView:
    request_id: str
    model_id: str
    num_prompt_tokens: int  # estimate (chars / 4 when not tokenized)
    slo_class: str = "standard"  # "interactive" | "standard" | "batch"
    est_step_ms: float = 0.0  # optional: one decode step of this model on such a slice
    tpot_slo_ms: float = 0.0  # optional: with est_step_ms, keeps co-served models in SLO
    ttft_slo_ms: float = 0.0  # optional: refuse slices whose prefill backlog alone passes it
    max_wait_frac: float = 0.5  # ... more precisely: backlog wait > this x the TTFT SLO


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


def can_serve(slice_view: WorkerState, model_id: str) -> bool:
    """A pinned slice serves only its pinned models; any other slice serves any model."""
    return not slice_view.pinned_models or model_id in slice_view.pinned_models


def has_capacity(slice_view: WorkerState) -> bool:
    """True while the slice's queue is below QUEUE_CAP_FACTOR batches."""
    num_queued = slice_view.num_running + slice_view.num_waiting
    return num_queued < QUEUE_CAP_FACTOR * max(1, slice_view.max_num_seqs)


def link_pressure(slice_view: WorkerState) -> float:
    """How oversubscribed the slice's link is, 0 (idle) .. >1 (demand past capacity)."""
    if slice_view.link_capacity_gbps > 0 and slice_view.link_demand_gbps > 0:
        return slice_view.link_demand_gbps / slice_view.link_capacity_gbps
    return max(0.0, slice_view.link_util)


def fits_cycle(req: RequestView, slice_view: WorkerState) -> bool:
    """A slice steps its models in turn, so a new model adds its step to every token's
    wait: refuse a slice not serving the model when cycle + step would pass the TPOT SLO."""
    if req.tpot_slo_ms <= 0 or req.model_id in slice_view.active_models or slice_view.cycle_ms <= 0:
        return True
    return slice_view.cycle_ms + req.est_step_ms <= req.tpot_slo_ms


def expected_wait_s(slice_view: WorkerState) -> float:
    """Seconds of prefill already queued on the slice (0 when its throughput is unknown)."""
    if slice_view.prefill_tokens_per_s <= 0:
        return 0.0
    return slice_view.queued_prefill_tokens / slice_view.prefill_tokens_per_s


def fits_ttft(req: RequestView, slice_view: WorkerState) -> bool:
    """False when the slice's prefill backlog alone would eat the request's TTFT budget."""
    if req.ttft_slo_ms <= 0:
        return True
    return 1000.0 * expected_wait_s(slice_view) <= req.max_wait_frac * req.ttft_slo_ms


def route_score(req: RequestView, slice_view: WorkerState) -> float:
    """Higher is better. See the module docstring for the terms."""
    weights = SLO_CLASS_WEIGHTS.get(req.slo_class, SLO_CLASS_WEIGHTS["standard"])
    rho = min(1.0, max(0.0, slice_view.cached_fraction.get(req.model_id, 0.0)))
    # its batch runs there (one more sequence shares the step), or the slice is idle (it
    # adds no step to anyone's cycle): either way joining costs other models nothing
    is_served = req.model_id in slice_view.active_models or not slice_view.active_models
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


def choose_slice(req: RequestView, slices: list[WorkerState]) -> str | None:
    """The worker_id of the best slice for `req`, or None when none can take it.

    None means: no slice may serve the model (all pinned to others), every slice that
    may is full, (with `req.tpot_slo_ms`) adding the model would push every slice's step
    cycle past the TPOT SLO, or (with `req.ttft_slo_ms`) every slice's prefill backlog is
    too long; the caller answers 503 (NoCapacity) or starts a slice. Ties go to the first
    slice listed.
    """
    best_id: str | None = None
    best_score = float("-inf")
    for slice_view in slices:
        if not can_serve(slice_view, req.model_id) or not has_capacity(slice_view):
            continue
        if not fits_cycle(req, slice_view) or not fits_ttft(req, slice_view):
            continue
        score = route_score(req, slice_view)
        if score > best_score:
            best_id, best_score = slice_view.worker_id, score
    return best_id


__all__ = [
    "DemandForecaster",
    "PrewarmAction",
    "QUEUE_CAP_FACTOR",
    "RequestView",
    "RouteWeights",
    "SLO_CLASS_WEIGHTS",
    "WorkerState",
    "can_serve",
    "choose_slice",
    "expected_wait_s",
    "fits_cycle",
    "fits_ttft",
    "has_capacity",
    "link_pressure",
    "plan_prewarm",
    "rho_target",
    "route_score",
]


# ---------------------------------------------------------------- demand forecasts


class DemandForecaster:
    """Per-model arrival-rate forecasts: an EWMA rate plus a periodic component.

    The EWMA is the exponentially decayed count / tau (requests/s), updated in O(1) per
    arrival. Arrivals are also counted in `bin_s` bins (the last `num_bins`); when the
    binned series of a model has an autocorrelation peak above `min_acf` at some lag
    L >= 2 bins, the forecast for t + h also looks at the count one period earlier (the
    bin at t + h - L) and takes the larger of the two, so a daily / hourly pattern warms
    the model before its burst comes back.
    """

    def __init__(self, tau_s: float = 60.0, bin_s: float = 10.0, num_bins: int = 360, min_acf: float = 0.5):
        if tau_s <= 0 or bin_s <= 0 or num_bins < 8:
            raise ValueError("tau_s and bin_s must be positive and num_bins >= 8")
        self.tau_s, self.bin_s, self.num_bins, self.min_acf = tau_s, bin_s, num_bins, min_acf
        self._rate: dict[str, tuple[float, float]] = {}  # model -> (rate at t, t)
        self._bins: dict[str, dict[int, int]] = {}  # model -> bin index -> count
        self._period: dict[str, tuple[int, int | None]] = {}  # model -> (bin computed, lag)

    def observe(self, model_id: str, t_s: float, num: int = 1) -> None:
        """Record `num` arrivals of `model_id` at time `t_s` (non-decreasing per model)."""
        self._rate[model_id] = (self.rate(model_id, t_s) + num / self.tau_s, t_s)
        bins = self._bins.setdefault(model_id, {})
        index = int(t_s // self.bin_s)
        bins[index] = bins.get(index, 0) + num
        if len(bins) > self.num_bins:
            oldest = index - self.num_bins
            for old in [b for b in bins if b <= oldest]:
                del bins[old]

    def rate(self, model_id: str, t_s: float) -> float:
        """EWMA arrival rate (req/s) at `t_s`, decayed since the last arrival."""
        rate, last_s = self._rate.get(model_id, (0.0, t_s))
        return rate * math.exp(-max(0.0, t_s - last_s) / self.tau_s)

    def models(self) -> list[str]:
        return list(self._rate)

    def period_bins(self, model_id: str, t_s: float) -> int | None:
        """The dominant period (in bins) of the model's recent counts, or None.

        Recomputed at most once per bin per model (cached), O(num_bins log num_bins).
        """
        now_bin = int(t_s // self.bin_s)
        cached = self._period.get(model_id)
        if cached is not None and cached[0] == now_bin:
            return cached[1]
        lag = _dominant_lag(self._series(model_id, t_s), self.min_acf)
        self._period[model_id] = (now_bin, lag)
        return lag

    def forecast(self, model_id: str, t_s: float, horizon_s: float = 30.0, periodic: bool = True) -> float:
        """Expected arrival rate (req/s) over [t_s, t_s + horizon_s]."""
        ewma = self.rate(model_id, t_s)
        if not periodic:
            return ewma
        lag = self.period_bins(model_id, t_s)
        if lag is None:
            return ewma
        bins = self._bins.get(model_id, {})
        first = int((t_s - lag * self.bin_s) // self.bin_s)
        last = int((t_s + horizon_s - lag * self.bin_s) // self.bin_s)
        past = sum(bins.get(b, 0) for b in range(first, last + 1))
        return max(ewma, past / (self.bin_s * (last - first + 1)))

    def _series(self, model_id: str, t_s: float) -> list[int] | None:
        bins = self._bins.get(model_id)
        if not bins or sum(bins.values()) < 8:
            return None
        now = int(t_s // self.bin_s)
        start = max(min(bins), now - self.num_bins + 1)
        if now - start + 1 < 8:
            return None
        return [bins.get(b, 0) for b in range(start, now + 1)]


def _dominant_lag(series: list[int] | None, min_acf: float) -> int | None:
    """Lag (>= 2) of the highest autocorrelation peak above `min_acf`, or None."""
    if series is None:
        return None
    x = np.asarray(series, dtype=np.float64)  # [N]
    x = x - x.mean()
    power = float(x @ x)
    if power <= 0:
        return None
    spectrum = np.fft.rfft(x, n=2 * x.size)
    acf = np.fft.irfft(spectrum * np.conj(spectrum))[: x.size // 2] / power  # [N/2]
    if acf.size <= 2:
        return None
    lag = int(np.argmax(acf[2:])) + 2
    return lag if acf[lag] > min_acf else None


# ---------------------------------------------------------------- prewarm planning


@dataclass(frozen=True)
class PrewarmAction:
    worker_id: str
    model_id: str
    rho: float  # target cached fraction; 0 = drop this model's tiles


def rho_target(hbm_gbps: float, link_gbps: float) -> float:
    """Ideal cached fraction: both bandwidths finish together, rho = B_hbm / (B_hbm + B_link)."""
    if hbm_gbps <= 0:
        return 0.0
    return hbm_gbps / (hbm_gbps + max(0.0, link_gbps))


def plan_prewarm(
    forecaster: DemandForecaster,
    slices: list[WorkerState],
    model_bytes: dict[str, int],
    now_s: float,
    slice_cache_budget_bytes: dict[str, int],
    horizon_s: float = 30.0,
    min_rate_rps: float = 0.02,
    rate_per_slice_rps: float = 0.5,
    max_slices_per_model: int = 8,
    rho_cap: float = 0.7,
    evict_unplanned: bool = False,
) -> list[PrewarmAction]:
    """Which models' hot tiles to cache in which slice, at what rho.

    Models are taken by forecast rate (highest first); a model expected to see at least
    `min_rate_rps` gets ceil(rate / rate_per_slice_rps) slices (at most
    `max_slices_per_model`), preferring slices that already hold its tiles or serve it,
    then slices on the least loaded links with the most free cache budget. The cache
    budget of a slice is its idle KV bytes (`slice_cache_budget_bytes`): prewarmed tiles
    live there and are dropped when KV needs the space, so one slice may be warm for
    several models as long as their tiles fit. rho <= `rho_cap` (use `rho_target`).
    With `evict_unplanned`, cached models of no planned slice that it does not serve get
    rho = 0 (otherwise tiles stay until KV or newer tiles need the space). Slices pinned
    to other models are skipped. Deterministic for equal inputs. Cost: one sort of the
    slices plus O(models x wanted slices).
    """
    budget = {s.worker_id: max(0, int(slice_cache_budget_bytes.get(s.worker_id, 0))) for s in slices}
    pressure = {s.worker_id: link_pressure(s) for s in slices}
    holders: dict[str, list[WorkerState]] = {}
    for s in slices:
        for model_id in set(s.cached_fraction) | set(s.models):
            holders.setdefault(model_id, []).append(s)
    general = sorted(slices, key=lambda s: (pressure[s.worker_id], -budget[s.worker_id], s.worker_id))
    planned: dict[tuple[str, str], float] = {}
    for model_id, rate in _ranked_demand(forecaster, model_bytes, now_s, horizon_s, min_rate_rps):
        num_bytes = max(1, model_bytes[model_id])
        num_wanted = min(max_slices_per_model, max(1, math.ceil(rate / rate_per_slice_rps)))
        for s in _pick_slices(model_id, holders.get(model_id, []), general, budget, pressure, num_wanted):
            existing = s.cached_fraction.get(model_id, 0.0) * num_bytes
            rho = min(rho_cap, (budget[s.worker_id] + existing) / num_bytes)
            if rho < 0.01:
                continue
            planned[(s.worker_id, model_id)] = round(rho, 4)
            budget[s.worker_id] -= max(0, int(rho * num_bytes - existing))
    return _diff_plan(planned, slices, evict_unplanned)


def _ranked_demand(forecaster, model_bytes, now_s, horizon_s, min_rate_rps) -> list[tuple[str, float]]:
    rates = [(m, forecaster.forecast(m, now_s, horizon_s)) for m in forecaster.models() if m in model_bytes]
    return sorted([(m, r) for m, r in rates if r >= min_rate_rps], key=lambda mr: (-mr[1], mr[0]))


def _pick_slices(model_id, own, general, budget, pressure, num_wanted) -> list[WorkerState]:
    """Slices holding the model's tiles / serving it first, then the general order."""

    def own_key(s: WorkerState):
        has_tiles = s.cached_fraction.get(model_id, 0.0) > 0
        return (not has_tiles, model_id not in s.models, pressure[s.worker_id], -budget[s.worker_id], s.worker_id)

    picked = [s for s in sorted(own, key=own_key) if can_serve(s, model_id)][:num_wanted]
    seen = {s.worker_id for s in picked}
    for s in general:
        if len(picked) >= num_wanted:
            break
        if s.worker_id not in seen and budget[s.worker_id] > 0 and can_serve(s, model_id):
            picked.append(s)
    return picked


def _diff_plan(planned: dict[tuple[str, str], float], slices: list[WorkerState], evict_unplanned: bool) -> list[PrewarmAction]:
    actions = []
    if evict_unplanned:
        for s in slices:
            for model_id, rho in sorted(s.cached_fraction.items()):
                if rho > 0 and (s.worker_id, model_id) not in planned and model_id not in s.models:
                    actions.append(PrewarmAction(s.worker_id, model_id, 0.0))
    current = {(s.worker_id, m): r for s in slices for m, r in s.cached_fraction.items()}
    for (worker_id, model_id), rho in sorted(planned.items()):
        if rho - current.get((worker_id, model_id), 0.0) > 0.05:
            actions.append(PrewarmAction(worker_id, model_id, rho))
    return actions
