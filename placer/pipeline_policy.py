"""Pipeline configuration policy: over how many slices a model runs, which, and how its
layers are split (pure: no NATS, Redis or torch).

Input: the live state records (`services.schemas.WorkerState`) of the model's driver
slice (where its requests are queued) and of the other slices, the model's current plan
and when it last changed. A slice's speed is its measured `prefill_tokens_per_s` (the
driver's when it has none yet). The model's pressure is its backlog in seconds:

    backlog_s = driver.queued_prefill_tokens / (the plan's measured rate, else the sum
                                                of the speeds of its slices)

- grow: backlog_s > `grow_backlog_s` and an idle slice (nothing running or waiting, not
  stopping) exists: add the fastest idle slice as the last stage;
- shrink: backlog_s < `shrink_backlog_s` and nothing waits: drop the last stage;
- learn: `rate_by_stages` holds the prefill tokens/s the model was measured at with each
  number of stages (the driver's `prefill_tokens_per_s` while it ran them; the caller
  keeps it). A plan changes only once it was measured; growth explores one count further
  while the current one is within `max_loss` of the best measured, else the plan moves
  toward the best measured count (backlog or not): a pipeline's bubbles and hops can
  cost more than its extra slices give, and more stages can pay after fewer did not;
- never twice within `cooldown_s` (hysteresis: a burst's tail does not flap the plan).
Layers are split in proportion to the slices' speeds (`split_layers`): heterogeneous
slices get unequal ranges. Used by `bench/pipeline_burst.py` and by the simulator (`sim/pipeline_burst.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.schemas import WorkerState


@dataclass(frozen=True)
class PipelinePlan:
    slice_ids: tuple[str, ...]               # the driver first
    layer_ranges: tuple[tuple[int, int], ...]

    @property
    def num_stages(self) -> int:
        return len(self.slice_ids)


@dataclass(frozen=True)
class PipelinePolicy:
    grow_backlog_s: float = 0.5
    shrink_backlog_s: float = 0.05
    cooldown_s: float = 2.0
    max_stages: int = 4
    min_gain: float = 0.1
    max_loss: float = 0.3


def split_layers(num_layers: int, speeds: list[float]) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per stage, sized in proportion to each stage's speed
    (a faster slice gets more layers); every stage gets at least one layer."""
    if not speeds or num_layers < len(speeds) or min(speeds) <= 0:
        raise ValueError(f"cannot split {num_layers} layers over speeds {speeds}")
    total, cuts, acc = sum(speeds), [0], 0.0
    for i, speed in enumerate(speeds[:-1]):
        acc += speed
        lowest, highest = cuts[-1] + 1, num_layers - (len(speeds) - 1 - i)
        cuts.append(min(highest, max(lowest, round(num_layers * acc / total))))
    cuts.append(num_layers)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def num_micro_batches(num_stages: int, has_prefill: bool) -> int:
    """Micro-batches of one pipelined step: two per stage when it carries prefill chunks (a
    step of n stages and m micro-batches takes (m + n - 1) / (n m) of one stage's time:
    more fill the bubble), one per stage for decode (each costs a hop, decode steps are short)."""
    return num_stages * (2 if has_prefill else 1)


def whole(driver_id: str, num_layers: int) -> PipelinePlan:
    """The model whole on its driver slice (one stage)."""
    return PipelinePlan((driver_id,), ((0, num_layers),))


def speed_of(state: WorkerState, default: float) -> float:
    return state.prefill_tokens_per_s if state.prefill_tokens_per_s > 0 else default


def backlog_s(driver: WorkerState, plan: PipelinePlan, speeds: dict[str, float], rate: float | None = None) -> float:
    """Seconds of queued prefill at the plan's measured rate (else its slices' summed speeds)."""
    capacity = rate or sum(speeds[s] for s in plan.slice_ids)
    return driver.queued_prefill_tokens / capacity if capacity > 0 else 0.0


def is_idle(state: WorkerState) -> bool:
    return not (state.num_running or state.num_waiting or state.is_stopping)


def plan_pipeline(num_layers: int, driver: WorkerState, others: list[WorkerState], current: PipelinePlan,
                  now_s: float, last_change_s: float, policy: PipelinePolicy = PipelinePolicy(),
                  rate_by_stages: dict[int, float] | None = None) -> PipelinePlan:
    """The plan to run from now: `current` or a plan one stage longer or shorter."""
    rates, n = rate_by_stages or {}, current.num_stages
    if now_s - last_change_s < policy.cooldown_s or (rate_by_stages is not None and n not in rates):
        return current  # a caller that measures: the current plan is measured before any change
    default = driver.prefill_tokens_per_s or 1.0
    speeds = {s.worker_id: speed_of(s, default) for s in others}
    speeds[driver.worker_id] = speed_of(driver, default)
    speeds.update({s: default for s in current.slice_ids if s not in speeds})  # a stage with no record yet
    want = wanted_stages(rates, n, policy)
    pressure = backlog_s(driver, current, speeds, rates.get(n))
    if want > n and pressure > policy.grow_backlog_s and n < min(policy.max_stages, num_layers):
        free = [s for s in others if s.worker_id not in current.slice_ids and is_idle(s)]
        if free:
            best = max(free, key=lambda s: speeds[s.worker_id])
            return _plan(current.slice_ids + (best.worker_id,), num_layers, speeds)
    if n > 1 and (want < n or (pressure < policy.shrink_backlog_s and not driver.num_waiting)):
        return _plan(current.slice_ids[:-1], num_layers, speeds)
    return current


def wanted_stages(rates: dict[int, float], n: int, policy: PipelinePolicy) -> int:
    """Where the measured rates point from n stages: n + 1 while it is unexplored and n is
    within `max_loss` of the best rate measured (a count past a dip may pay: a stage holds
    fewer layers, so more of them fit its slice's cache), else the best measured count
    when it is `min_gain` faster than n, else n. No rates: n + 1 (the backlog decides)."""
    best = max(rates, key=rates.get, default=n)
    if n + 1 not in rates and rates.get(n, 0.0) >= (1 - policy.max_loss) * rates.get(best, 0.0):
        return n + 1
    return best if rates.get(best, 0.0) >= rates.get(n, 0.0) * (1 + policy.min_gain) else n


def _plan(slice_ids: tuple[str, ...], num_layers: int, speeds: dict[str, float]) -> PipelinePlan:
    ranges = split_layers(num_layers, [speeds[s] for s in slice_ids])
    return PipelinePlan(slice_ids, tuple(ranges))
