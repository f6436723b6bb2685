"""c2cserve's serving plans in the simulator: `placer.plan.PlanView`s from the cost model.

The placer's `choose_plan` picks among streaming on an existing slice, progressive
caching there, and a new slice (bigger for a long prompt, or big enough to hold the
whole model: the loading baselines' choice) by predicted TTFT. This module predicts the
times of each plan with the same cost model the simulation then runs.
"""

from __future__ import annotations

import math

from placer.plan import PlanView, ServeMode
from sim.cluster import SOLO_CHUNK_MAX, Gpu
from sim.cost_model import GB, PROFILE_ORDER, ModelSpec, Profile, fair_link_gbps, max_rho, step_time


def plan_profiles(profile: str, whole: str | None) -> list[str]:
    """The profiles a new slice for a request may take: its own and every bigger one up
    to `whole`, the smallest that holds the model (the loading baselines' choice; None:
    no profile does, so up to the biggest)."""
    first, last = PROFILE_ORDER.index(profile), PROFILE_ORDER.index(whole or PROFILE_ORDER[-1])
    return PROFILE_ORDER[first:max(first, last) + 1]


def prefill_s(spec: ModelSpec, prof: Profile, prompt: int, rho: float, link_gbps: float, chunk: int) -> float:
    """Seconds to prefill `prompt` tokens with nothing else running: whole chunks of
    max(chunk, min(prompt, SOLO_CHUNK_MAX)) tokens, one pass over the weights each."""
    chunk_tokens = max(chunk, min(prompt, SOLO_CHUNK_MAX))
    num_full, last = divmod(prompt, chunk_tokens)
    total = num_full * step_time(spec, prof, chunk_tokens, 0, rho, link_gbps)
    if last:
        total += step_time(spec, prof, last, 0, rho, link_gbps)
    return total


def link_left_gbps(gpu: Gpu, prof: Profile, demand_gbps: float = 0.0) -> float:
    """The link rate a slice of `prof` can expect on `gpu`: what the others leave, at
    least its fair share (processor sharing), at most what its SMs pull."""
    if gpu.link_gbps == math.inf:
        return prof.link_cap_gbps
    spare = gpu.link_gbps - (gpu.demand_gbps - demand_gbps)
    return min(prof.link_cap_gbps, max(fair_link_gbps(prof), spare))


def fill_gbps_on(gpu: Gpu, fill_gbps: float, demand_gbps: float = 0.0) -> float:
    """The copy engines' rate on `gpu`: the loader rate, less what others use, at least
    the share of one flow among the GPU's streams."""
    if gpu.link_gbps == math.inf:
        return fill_gbps
    num_flows = 1 + len(gpu.instances) + len(gpu.loads)
    spare = gpu.link_gbps - (gpu.demand_gbps - demand_gbps)
    return min(fill_gbps, max(gpu.link_gbps / num_flows, spare))


def plan_for(spec: ModelSpec, prompt: int, prof: Profile, gpu: Gpu, cached_bytes: float, cache_room_bytes: float,
             wait_s: float, fill_gbps: float, chunk: int, worker_id: str | None,
             own_demand_gbps: float = 0.0) -> PlanView:
    """Serving `spec` on a slice of `prof` on `gpu` (an existing one when `worker_id` is
    set, else a new one): streaming at the rho it has, filled in the background up to
    the rho its memory allows."""
    link_gbps = link_left_gbps(gpu, prof, own_demand_gbps)
    rho_now = min(1.0, cached_bytes / spec.weight_bytes)
    target_bytes = min(max_rho(spec, prof) * spec.weight_bytes, cached_bytes + cache_room_bytes)
    target_rho = max(rho_now, target_bytes / spec.weight_bytes)
    stream = prefill_s(spec, prof, prompt, rho_now, link_gbps, chunk)
    cached = prefill_s(spec, prof, prompt, target_rho, link_gbps, chunk)
    fill_bytes = max(0.0, target_bytes - cached_bytes)
    mode = ServeMode.PROGRESSIVE if fill_bytes > 0.01 * spec.weight_bytes else ServeMode.STREAM
    fill = fill_bytes / (fill_gbps_on(gpu, fill_gbps) * GB) if mode == ServeMode.PROGRESSIVE else 0.0
    step = step_time(spec, prof, 1, prompt, target_rho, link_gbps)
    return PlanView(worker_id, mode, wait_s, stream, fill, cached, target_rho, step,
                    is_new_slice=worker_id is None, units=prof.units)


__all__ = ["fill_gbps_on", "link_left_gbps", "plan_for", "plan_profiles", "prefill_s"]
