"""How a request's model is served on a slice, chosen by predicted TTFT (pure module).

A slice can serve a model in one of three ways; the loading baselines' choices are
special cases of these, so the placer can always fall back to what they do:

- `STREAM`: read the uncached weights from host memory at the slice's cached fraction
  rho, as it is now (any slice, at once);
- `PROGRESSIVE`: stream now while the copy engines copy the model's tiles into the slice
  in the background (up to `target_rho`), so every later step, and the rest of this
  prefill, reads more from slice memory; a model that stays hot converges to loaded
  speed;
- `LOAD`: copy the tiles first, then compute from slice memory (what a loading system
  does; never faster than PROGRESSIVE in this model, kept so the choice is explicit and
  so a slice that cannot stream, e.g. one whose link share is near zero, still serves).

A plan may also be a new, bigger slice formed for a long prompt (`is_new_slice`).
The caller fills each `PlanView` from its cost model (the simulator) or from telemetry
(live: a CPU slice streams from the shared host store, where a copy would be a DRAM to
DRAM copy that makes nothing faster, so only STREAM plans exist there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum


class ServeMode(IntEnum):
    STREAM = 0
    PROGRESSIVE = 1
    LOAD = 2


@dataclass(frozen=True)
class PlanView:
    """One way to serve a request; times in seconds from now."""

    worker_id: str | None  # None: a slice formed for this request
    mode: ServeMode
    wait_s: float  # work queued ahead of the request on the slice
    stream_prefill_s: float  # the prompt's prefill at the slice's current rho and link share
    fill_s: float = 0.0  # copying the tiles up to target_rho (PROGRESSIVE, LOAD)
    cached_prefill_s: float = 0.0  # the prefill once the tiles are in
    target_rho: float = 0.0
    step_s: float = 0.0  # a decode step of the model there after the fill (TPOT check)
    is_new_slice: bool = False
    units: int = 1  # compute units the plan takes (a new slice's size)


def predicted_ttft_s(plan: PlanView) -> float:
    """Queue wait plus the prefill, by mode.

    PROGRESSIVE: the prefill streams while the fill runs; once the tiles are in, what is
    left of it runs at the cached speed. With a fraction f of the streamed prefill done
    when the fill ends (f = fill / stream), TTFT = fill + (1 - f) x cached, or the
    streamed prefill alone when it ends first.
    """
    if plan.mode == ServeMode.STREAM or plan.fill_s <= 0:
        return plan.wait_s + plan.stream_prefill_s
    if plan.mode == ServeMode.LOAD:
        return plan.wait_s + plan.fill_s + plan.cached_prefill_s
    if plan.stream_prefill_s <= plan.fill_s:
        return plan.wait_s + plan.stream_prefill_s
    done_frac = plan.fill_s / plan.stream_prefill_s if plan.stream_prefill_s < math.inf else 0.0
    return plan.wait_s + plan.fill_s + (1.0 - done_frac) * plan.cached_prefill_s


def choose_plan(plans: list[PlanView], tpot_slo_s: float = 0.0, new_slice_margin_s: float = 0.0) -> PlanView | None:
    """The plan with the smallest predicted TTFT whose decode step fits the TPOT SLO.

    A new slice costs units that other requests may need, so it wins only when it is
    more than `new_slice_margin_s` faster than the best existing slice; among equal
    predictions the plan that takes fewer units, then the one listed first, wins.
    """
    fitting = [p for p in plans if tpot_slo_s <= 0 or p.step_s <= tpot_slo_s] or plans
    if not fitting:
        return None
    existing = [p for p in fitting if not p.is_new_slice]
    fresh = [p for p in fitting if p.is_new_slice]
    best_old = _fastest(existing)
    best_new = _fastest(fresh)
    if best_old is None or best_new is None:
        return best_old or best_new
    if predicted_ttft_s(best_new) + new_slice_margin_s < predicted_ttft_s(best_old):
        return best_new
    return best_old


def _fastest(plans: list[PlanView]) -> PlanView | None:
    if not plans:
        return None
    return min(enumerate(plans), key=lambda ip: (predicted_ttft_s(ip[1]), ip[1].units, ip[0]))[1]


__all__ = ["PlanView", "ServeMode", "choose_plan", "predicted_ttft_s"]
