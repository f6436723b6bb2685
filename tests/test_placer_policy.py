"""Placer policy: routing, demand forecasts, prewarm planning."""

from __future__ import annotations

import math

from placer.policy import (
    DemandForecaster,
    PrewarmAction,
    RequestView,
    choose_slice,
    plan_prewarm,
    rho_target,
    route_score,
)
from services.schemas import WorkerState

GB = 10**9


def view(worker_id: str, gpu: str = "g0", models=(), cached=None, running: int = 0, waiting: int = 0,
         max_seqs: int = 16, kv_free: float = 1.0, link: float = 0.0, pinned=(), cycle_ms: float = 0.0) -> WorkerState:
    return WorkerState(worker_id=worker_id, node="n0", gpu=gpu, backend="cuda", models=frozenset(models),
                     active_models=frozenset(models),
                     cached_fraction=dict(cached or {}), num_running=running, num_waiting=waiting,
                     max_num_seqs=max_seqs, kv_free_frac=kv_free, link_util=link,
                     pinned_models=frozenset(pinned), cycle_ms=cycle_ms)


def req(model: str = "m", slo_class: str = "standard", **kw) -> RequestView:
    return RequestView("r1", model, 100, slo_class, **kw)


def test_none_when_nothing_fits():
    assert choose_slice(req(), []) is None
    assert choose_slice(req("a"), [view("w", pinned={"b"})]) is None  # pinned to another model
    assert choose_slice(req(), [view("w", running=16, waiting=48)]) is None  # full queue


def test_pinned_slice_serves_its_model():
    slices = [view("free", running=10), view("pinned", pinned={"m"})]
    assert choose_slice(req("m"), slices) == "pinned"


def test_cache_affinity_beats_an_idle_cold_slice_but_not_a_full_queue():
    warm = view("warm", models={"m"}, cached={"m": 0.6}, running=4)
    cold = view("cold")
    assert choose_slice(req(), [cold, warm]) == "warm"
    busy_warm = view("warm", models={"m"}, cached={"m": 0.6}, running=16, waiting=16)
    assert choose_slice(req(), [cold, busy_warm]) == "cold"


def test_link_contention_steers_uncached_work_away():
    hot_link = view("hot", gpu="g0", link=0.95)
    quiet = view("quiet", gpu="g1", link=0.1)
    assert choose_slice(req(), [hot_link, quiet]) == "quiet"
    # fully cached weights do not cross the link: contention costs nothing there
    cached_hot = view("hot", gpu="g0", link=0.95, cached={"m": 1.0})
    assert route_score(req(), cached_hot) > route_score(req(), view("x", link=0.95))


def test_interactive_weighs_queue_more_than_batch():
    warm_queued = view("warm", models={"m"}, cached={"m": 0.5}, running=12)
    cold_idle = view("cold")
    assert choose_slice(req(slo_class="batch"), [cold_idle, warm_queued]) == "warm"
    assert choose_slice(req(slo_class="interactive"), [cold_idle, warm_queued]) == "cold"


def test_cycle_fit_keeps_co_served_models_within_tpot():
    busy = view("busy", models={"other"}, cycle_ms=90.0)
    empty = view("empty", running=3)
    r = req(est_step_ms=30.0, tpot_slo_ms=100.0)
    assert choose_slice(r, [busy, empty]) == "empty"
    assert choose_slice(r, [busy]) is None
    assert choose_slice(req(est_step_ms=30.0, tpot_slo_ms=150.0), [busy]) == "busy"


def test_forecaster_ewma_decays():
    f = DemandForecaster(tau_s=10.0)
    for i in range(100):
        f.observe("m", i * 0.1)  # 10 req/s for 10 s
    assert 5.0 < f.rate("m", 10.0) < 10.0
    assert f.rate("m", 60.0) < 0.1 * f.rate("m", 10.0)
    assert f.rate("unknown", 5.0) == 0.0


def test_forecaster_detects_period_and_forecasts_the_next_burst():
    f = DemandForecaster(tau_s=20.0, bin_s=10.0, num_bins=120, min_acf=0.4)
    t = 0.0
    while t < 1200.0:  # bursts of 50 s every 200 s, 2 req/s inside a burst
        if t % 200.0 < 50.0:
            f.observe("m", t)
        t += 0.5
    assert f.period_bins("m", 1199.0) == 20
    ewma = f.forecast("m", 1199.0, 30.0, periodic=False)
    periodic = f.forecast("m", 1199.0, 30.0)
    assert ewma < 0.1  # the EWMA has forgotten the last burst
    assert periodic > 1.0  # the periodic part expects the next one


def test_aperiodic_traffic_has_no_period():
    f = DemandForecaster(bin_s=10.0, num_bins=100)
    for i in range(1000):
        f.observe("m", i * 1.0)  # steady
    assert f.period_bins("m", 1000.0) is None


def _busy_forecaster(rates: dict[str, float], until_s: float = 60.0) -> DemandForecaster:
    f = DemandForecaster(tau_s=30.0)
    for model, rate in rates.items():
        for i in range(int(rate * until_s)):
            f.observe(model, i / rate)
    return f


def test_prewarm_plans_popular_models_within_budget():
    f = _busy_forecaster({"hot": 4.0, "warm": 0.5, "cold": 0.001})
    slices = [view(f"w{i}", gpu=f"g{i % 2}") for i in range(3)]
    budgets = {s.worker_id: 14 * GB for s in slices}
    model_bytes = {"hot": 16 * GB, "warm": 4 * GB, "cold": 4 * GB}
    actions = plan_prewarm(f, slices, model_bytes, 60.0, budgets, rate_per_slice_rps=1.0)
    by_model: dict[str, list[PrewarmAction]] = {}
    for action in actions:
        by_model.setdefault(action.model_id, []).append(action)
    assert "cold" not in by_model
    assert len(by_model["hot"]) > len(by_model["warm"]) >= 1
    assert all(a.rho <= 0.7 for a in actions)
    for worker_id in budgets:  # tiles fit the idle KV budget of each slice
        used = sum(a.rho * model_bytes[a.model_id] for a in actions if a.worker_id == worker_id)
        assert used <= budgets[worker_id] + 1
    multi = [w for w in budgets if len({a.model_id for a in actions if a.worker_id == w}) > 1]
    assert multi  # one slice may be warm for several models


def test_prewarm_prefers_slices_already_holding_tiles_and_is_idempotent():
    f = _busy_forecaster({"m": 0.4})
    holder = view("holder", cached={"m": 0.7})
    others = [view(f"w{i}") for i in range(4)]
    budgets = {s.worker_id: 20 * GB for s in [holder] + others}
    actions = plan_prewarm(f, others + [holder], {"m": 10 * GB}, 60.0, budgets)
    assert actions == []  # the one wanted slice already holds rho 0.7
    evict = plan_prewarm(_busy_forecaster({}), [holder], {"m": 10 * GB}, 60.0, budgets, evict_unplanned=True)
    assert evict == [PrewarmAction("holder", "m", 0.0)]


def test_prewarm_skips_pinned_and_budgetless_slices():
    f = _busy_forecaster({"m": 2.0})
    slices = [view("pinned", pinned={"x"}), view("full")]
    actions = plan_prewarm(f, slices, {"m": 10 * GB}, 60.0, {"pinned": 50 * GB, "full": 0})
    assert actions == []


def test_rho_target_is_the_bandwidth_split():
    assert math.isclose(rho_target(500.0, 160.0), 500.0 / 660.0)
    assert rho_target(0.0, 100.0) == 0.0
    assert rho_target(100.0, 0.0) == 1.0


def test_prefill_backlog_rule_skips_slices_that_would_miss_ttft():
    backlog = WorkerState("backlog", node="n0", gpu="g0", backend="cuda", models=["m"], active_models=["m"],
                          cached_fraction={"m": 0.7},
                          num_running=1, num_waiting=3, max_num_seqs=16, kv_free_frac=1.0, link_util=0.0,
                          queued_prefill_tokens=20000, prefill_tokens_per_s=10000.0)  # 2 s queued
    fresh = view("fresh")
    r = req(ttft_slo_ms=1000.0)
    assert choose_slice(r, [backlog, fresh]) == "fresh"
    assert choose_slice(r, [backlog]) is None  # caller forms a new slice or queues
    assert choose_slice(req(), [backlog]) == "backlog"  # no TTFT given: rule off
    assert choose_slice(req(ttft_slo_ms=5000.0), [backlog, fresh]) == "backlog"  # fits: affinity wins
