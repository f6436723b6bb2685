"""A burst on one model at cluster scale: pinned whole to one MIG slice, or spread over
idle slices by the pipeline policy (`placer/pipeline_policy.py`), step by step.

The model's driver slice runs continuous batching (a prefill chunk budget plus one
token per decoding request per step). A step over n stages with m micro-batches takes
(m + n - 1) stage-times of one micro-batch, a stage-time being its share of the layers
of the step's cost (`sim.cost_model.step_time`, each stage streaming the part of its layers its slice
memory does not hold over its own GPU's link share; fewer layers per slice, more of them
cached) plus a hop for the activations. Micro-batches follow the
engine's rule (`num_micro_batches`: 2n on steps with prefill, n on decode steps).

Every `period_s` the policy sees the driver's state record (`WorkerState`, as a live
worker fills it) and the idle slices; a new plan takes effect after its switch time:
the moved layers' KV of the requests in flight copied over the link (the background
copy; the engine switches at a step boundary).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from placer.pipeline_policy import (
    PipelinePlan,
    PipelinePolicy,
    num_micro_batches,
    plan_pipeline,
    whole,
)
from services.schemas import WorkerState
from sim.cost_model import (
    GB,
    PROFILES,
    STEP_OVERHEAD_S,
    fair_link_gbps,
    kv_reserve_bytes,
    make_spec,
    step_time,
)

HOP_S = 50e-6              # one activation hand-off between stages (assumed: NVLink/NIC latency)
HIDDEN_BYTES_PER_TOKEN = 4096 * 2   # a dense-8b residual stream in bf16 (Llama-3.1-8B)


@dataclass(frozen=True)
class BurstConfig:
    family: str = "dense-8b"
    profile: str = "1g.12gb"
    num_requests: int = 64
    prompt_tokens: int = 1024
    output_tokens: int = 32
    num_idle_slices: int = 7     # on other GPUs: each has its own link share
    chunk_tokens: int = 512
    max_seqs: int = 64
    period_s: float = 0.05
    policy: PipelinePolicy = PipelinePolicy(cooldown_s=0.5, max_stages=8)


def stage_rho(cfg: BurstConfig, num_stages: int) -> float:
    """Cached fraction of a stage's layers in its slice: a stage holds 1/num_stages of the
    weights and of the KV reserve, so the more stages, the more of each fits (1.0: all)."""
    spec, prof = make_spec("burst", cfg.family), PROFILES[cfg.profile]
    room = prof.usable_bytes - kv_reserve_bytes(spec) / num_stages
    return max(0.0, min(1.0, room * num_stages / spec.weight_bytes))


def stage_step_s(cfg: BurstConfig, num_tokens: int, ctx_tokens: float, num_stages: int) -> float:
    """One micro-batch's time on one stage (1/num_stages of the layers, cached as `stage_rho`)."""
    spec, prof = make_spec("burst", cfg.family), PROFILES[cfg.profile]
    whole_s = step_time(spec, prof, num_tokens, ctx_tokens, stage_rho(cfg, num_stages), fair_link_gbps(prof))
    hop_s = HOP_S + num_tokens * HIDDEN_BYTES_PER_TOKEN / (fair_link_gbps(prof) * GB) if num_stages > 1 else 0.0
    return (whole_s - STEP_OVERHEAD_S) / num_stages + STEP_OVERHEAD_S + hop_s


def pipeline_step_s(cfg: BurstConfig, prefill_tokens: int, num_decode: int, ctx_tokens: float, stages: int) -> float:
    tokens = prefill_tokens + num_decode
    m = 1 if stages == 1 else max(1, min(tokens, num_micro_batches(stages, prefill_tokens > 0)))
    return (m + stages - 1) * stage_step_s(cfg, -(-tokens // m), ctx_tokens / m, stages)


def switch_s(cfg: BurstConfig, old: PipelinePlan, new: PipelinePlan, tokens_in_kv: float) -> float:
    """The background KV copy of the layers that change slice (the switch waits for it)."""
    spec = make_spec("burst", cfg.family)
    moved = sum(1 for layer in range(spec.num_layers)
                if _owner(old, layer) != _owner(new, layer)) / spec.num_layers
    return tokens_in_kv * spec.kv_bytes_per_token * moved / (fair_link_gbps(PROFILES[cfg.profile]) * GB)


def _owner(plan: PipelinePlan, layer: int) -> str:
    return next(s for s, (a, b) in zip(plan.slice_ids, plan.layer_ranges, strict=True) if a <= layer < b)


def run_burst(cfg: BurstConfig, use_policy: bool) -> dict:
    """TTFTs (s) of a burst of cfg.num_requests at t=0, and the plans it went through."""
    spec = make_spec("burst", cfg.family)
    waiting = deque(range(cfg.num_requests))
    left = [cfg.prompt_tokens] * cfg.num_requests          # prefill tokens left
    decoding: dict[int, int] = {}                          # request -> tokens still to generate
    ttft: dict[int, float] = {}
    plan, pending, changed_s, next_policy_s, now_s = whole("driver", spec.num_layers), None, -1e9, 0.0, 0.0
    idle = [WorkerState(f"idle{i}") for i in range(cfg.num_idle_slices)]
    speed = cfg.chunk_tokens / stage_step_s(cfg, cfg.chunk_tokens, 0.0, 1)
    changes, rates, since = [], {}, (0.0, 0)   # rates: stages -> measured prefill tokens/s
    while waiting or decoding:
        if pending is not None and now_s >= pending[0]:
            plan, pending, since = pending[1], None, (now_s, _prefilled(cfg, left))
            changes.append((round(now_s, 3), plan.num_stages))
        if use_policy and pending is None and now_s >= next_policy_s:
            next_policy_s = now_s + cfg.period_s
            if now_s > since[0] and _prefilled(cfg, left) > since[1]:
                rates[plan.num_stages] = (_prefilled(cfg, left) - since[1]) / (now_s - since[0])
            driver = WorkerState("driver", num_running=len(decoding), num_waiting=len(waiting),
                                 queued_prefill_tokens=sum(left[r] for r in waiting), prefill_tokens_per_s=speed)
            new = plan_pipeline(spec.num_layers, driver, idle, plan, now_s, changed_s, cfg.policy, rates)
            if new != plan:
                in_kv = sum(cfg.prompt_tokens - left[r] for r in waiting) + cfg.prompt_tokens * len(decoding)
                pending, changed_s = (now_s + switch_s(cfg, plan, new, in_kv), new), now_s
        now_s = _step(cfg, plan, waiting, left, decoding, ttft, now_s)
    ttfts = sorted(ttft.values())
    return {"ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
            "done_s": now_s, "changes": changes}


def _prefilled(cfg: BurstConfig, left: list[int]) -> int:
    return cfg.prompt_tokens * len(left) - sum(left)


def _step(cfg: BurstConfig, plan: PipelinePlan, waiting: deque, left: list[int], decoding: dict[int, int],
          ttft: dict[int, float], now_s: float) -> float:
    """One engine step: decode tokens first, then prefill chunks FIFO under the budget."""
    budget, finished_prefill = cfg.chunk_tokens, []
    for r in list(waiting):
        if budget <= 0 or len(decoding) + len(finished_prefill) >= cfg.max_seqs:
            break
        take = min(budget, left[r])
        left[r] -= take
        budget -= take
        if left[r] == 0:
            finished_prefill.append(r)
    ctx = cfg.prompt_tokens * len(decoding)
    now_s += pipeline_step_s(cfg, cfg.chunk_tokens - budget, len(decoding), ctx, plan.num_stages)
    for r in list(decoding):
        decoding[r] -= 1
        if decoding[r] <= 0:
            del decoding[r]
    for r in finished_prefill:
        waiting.remove(r)
        ttft[r] = now_s
        decoding[r] = cfg.output_tokens - 1
    return now_s


def compare(cfg: BurstConfig = BurstConfig()) -> dict:
    """Pinned vs policy, side by side, on the same burst."""
    pinned, policy = run_burst(cfg, False), run_burst(cfg, True)
    return {"config": {k: v for k, v in cfg.__dict__.items() if k != "policy"} | {"policy": cfg.policy.__dict__},
            "pinned": pinned, "policy": policy, "p99_gain": pinned["ttft_p99_s"] / policy["ttft_p99_s"]}
