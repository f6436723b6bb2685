"""Controller policy: the feedback law in closed loop against a simple plant model."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from controller.policy import SLO, Knobs, Limits, WorkerController
from services.schemas import WorkerState


def state(t_s, ttft_p50_ms, tpot_p50_ms, num_waiting, num_running, **kw) -> WorkerState:
    """One state sample of a worker, as its telemetry carries it."""
    return WorkerState("w", t_s=t_s, ttft_p50_ms=ttft_p50_ms, tpot_p50_ms=tpot_p50_ms,
                       num_waiting=num_waiting, num_running=num_running, **kw)


class Plant:
    """A slice whose decode step time grows with the prefill chunk and with link contention.

    step_ms = base_ms * contention + per_token_ms * chunk: the chunk's compute rides in
    every decode step (chunked prefill), contention stretches the weight streaming part.
    TTFT falls as the chunk grows (fewer steps per prompt).
    """

    def __init__(self, base_ms: float = 40.0, per_token_ms: float = 0.4, prompt_tokens: int = 2048):
        self.base_ms, self.per_token_ms, self.prompt_tokens = base_ms, per_token_ms, prompt_tokens
        self.contention = 1.0

    def tpot_ms(self, knobs: Knobs) -> float:
        return self.base_ms * self.contention + self.per_token_ms * knobs.chunk_size

    def ttft_ms(self, knobs: Knobs) -> float:
        return self.tpot_ms(knobs) * max(1.0, self.prompt_tokens / knobs.chunk_size)


def run_loop(ctl: WorkerController, plant: Plant, num_steps: int, t0_s: float = 0.0, dt_s: float = 0.25,
             spike_at: int | None = None, spike: float = 1.0, waiting: int = 4):
    """Closed loop: sample the plant, feed the controller, apply knobs. Returns traces."""
    chunks, tpots = [], []
    for step in range(num_steps):
        if spike_at is not None and step == spike_at:
            plant.contention = spike
        knobs = ctl.knobs
        sample = state(t_s=t0_s + step * dt_s, ttft_p50_ms=plant.ttft_ms(knobs),
                               tpot_p50_ms=plant.tpot_ms(knobs), num_waiting=waiting, num_running=8)
        ctl.update(sample)
        chunks.append(ctl.knobs.chunk_size)
        tpots.append(plant.tpot_ms(ctl.knobs))
    return chunks, tpots


def sign_changes(values: list[float]) -> int:
    deltas = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum(1 for a, b in itertools.pairwise(deltas) if (a > 0) != (b > 0))


def test_contention_spike_settles_without_oscillation():
    slo = SLO(ttft_ms=5000.0, tpot_ms=200.0)
    ctl = WorkerController(slo, Knobs(chunk_size=512))
    plant = Plant()
    run_loop(ctl, plant, 40)  # settle before the spike
    before = ctl.knobs.chunk_size
    chunks, tpots = run_loop(ctl, plant, 80, t0_s=10.0, spike_at=0, spike=3.0)
    assert tpots[-1] <= slo.tpot_ms  # back inside the SLO
    assert chunks[-1] < before  # by shrinking the chunk
    assert sign_changes(chunks) == 0  # monotone: no oscillation
    settled = chunks[-1]
    first_settled = next(i for i, c in enumerate(chunks) if c == settled)
    assert first_settled < 40  # within 10 s of 0.25 s samples
    assert all(c == settled for c in chunks[first_settled:])  # and it stays there


def test_spike_release_returns_monotonically():
    slo = SLO(ttft_ms=5000.0, tpot_ms=200.0)
    ctl = WorkerController(slo, Knobs(chunk_size=512))
    plant = Plant()
    run_loop(ctl, plant, 60, spike_at=0, spike=3.0)
    low = ctl.knobs.chunk_size
    chunks, tpots = run_loop(ctl, plant, 120, t0_s=20.0, spike_at=0, spike=1.0)
    assert chunks[-1] > low
    assert sign_changes(chunks) == 0
    assert max(tpots) <= slo.tpot_ms  # growing back never overshoots the SLO


def test_rate_limit_and_max_step():
    limits = Limits(max_step=1.5, min_interval_s=1.0)
    ctl = WorkerController(SLO(tpot_ms=100.0), Knobs(chunk_size=1024), limits)
    first = ctl.update(state(0.0, None, 1000.0, 2, 8))
    assert first is not None and first.chunk_size >= int(1024 / 1.5)  # at most /1.5 per update
    assert ctl.update(state(0.5, None, 1000.0, 2, 8)) is None  # too soon
    assert ctl.update(state(1.0, None, 1000.0, 2, 8)) is not None


def test_dead_band_leaves_knobs_alone():
    ctl = WorkerController(SLO(ttft_ms=1000.0, tpot_ms=200.0), Knobs(chunk_size=256))
    for step in range(20):
        assert ctl.update(state(step * 0.5, 500.0, 170.0, 3, 8)) is None
    assert ctl.knobs == Knobs(chunk_size=256)


def test_link_bound_holds_chunk_and_grows_when_ttft_late():
    slo = SLO(ttft_ms=1000.0, tpot_ms=100.0)
    ctl = WorkerController(slo, Knobs(chunk_size=256))
    hold = state(0.0, 500.0, 300.0, 0, 8, link_gbps=95.0, link_capacity_gbps=100.0)
    assert ctl.update(hold) is None  # shrinking the chunk would not shorten a link-bound step
    late = state(1.0, 3000.0, 300.0, 5, 8, link_gbps=95.0, link_capacity_gbps=100.0)
    knobs = ctl.update(late)
    assert knobs is not None and knobs.chunk_size > 256 and knobs.max_num_seqs == 16


def test_batch_cap_shrinks_only_at_min_chunk_and_regrows():
    limits = Limits(min_chunk=32)
    ctl = WorkerController(SLO(tpot_ms=50.0), Knobs(chunk_size=32, max_num_seqs=16), limits)
    knobs = ctl.update(state(0.0, None, 200.0, 0, 16))
    assert knobs is not None and knobs.chunk_size == 32 and knobs.max_num_seqs < 16
    seqs = knobs.max_num_seqs
    t = 1.0
    for _ in range(10):  # now far below the SLO with a queue and a full batch: regrow
        ctl.update(state(t, None, 5.0, 10, ctl.knobs.max_num_seqs))
        t += 1.0
    assert ctl.knobs.max_num_seqs > seqs
    assert ctl.knobs.max_num_batched_tokens >= ctl.knobs.chunk_size + ctl.knobs.max_num_seqs


@pytest.mark.parametrize("kv_free, direction", [(0.05, -1), (0.5, 0)])
def test_rho_cap_yields_to_kv(kv_free, direction):
    ctl = WorkerController(SLO(), Knobs(rho_cap=1.0))
    knobs = ctl.update(state(0.0, 100.0, 100.0, 0, 1, kv_free_frac=kv_free))
    rho = knobs.rho_cap if knobs else ctl.knobs.rho_cap
    assert (rho < 1.0) if direction < 0 else (rho == 1.0)


def test_none_samples_change_nothing():
    ctl = WorkerController(SLO(), Knobs())
    assert ctl.update(state(0.0, None, None, 0, 0)) is None
    assert replace(ctl.knobs) == Knobs()
