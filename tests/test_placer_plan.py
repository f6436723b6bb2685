"""placer/plan.py: serving plans by predicted TTFT, and the simulator's use of them."""

from __future__ import annotations

import math

from placer.plan import PlanView, ServeMode, choose_plan, predicted_ttft_s
from sim.cost_model import PROFILES, SLLM_LOADER_GBPS, make_spec, max_rho
from sim.planning import plan_for, prefill_s
from sim.run import SimConfig, make_inputs, run_system


def test_progressive_is_never_slower_than_load_or_stream():
    for stream, fill, cached in [(1.0, 0.2, 0.1), (0.1, 0.5, 0.05), (2.0, 2.0, 1.0), (math.inf, 0.3, 0.2)]:
        prog = PlanView(None, ServeMode.PROGRESSIVE, 0.0, stream, fill, cached)
        load = PlanView(None, ServeMode.LOAD, 0.0, stream, fill, cached)
        just = PlanView(None, ServeMode.STREAM, 0.0, stream)
        assert predicted_ttft_s(prog) <= predicted_ttft_s(load) + 1e-12
        assert predicted_ttft_s(prog) <= predicted_ttft_s(just) + 1e-12


def test_progressive_ttft_formula():
    # half of the streamed prefill is done when the fill lands; the other half runs cached
    plan = PlanView("w", ServeMode.PROGRESSIVE, wait_s=0.5, stream_prefill_s=1.0, fill_s=0.5, cached_prefill_s=0.2)
    assert math.isclose(predicted_ttft_s(plan), 0.5 + 0.5 + 0.5 * 0.2)


def test_choose_plan_prefers_existing_slice_unless_new_is_clearly_faster():
    old = PlanView("w1", ServeMode.STREAM, 0.0, 0.30)
    new_fast = PlanView(None, ServeMode.PROGRESSIVE, 0.0, 0.5, 0.05, 0.01, is_new_slice=True, units=3)
    new_close = PlanView(None, ServeMode.PROGRESSIVE, 0.0, 0.5, 0.29, 0.0, is_new_slice=True, units=3)
    assert choose_plan([old, new_fast], new_slice_margin_s=0.02) is new_fast
    assert choose_plan([old, new_close], new_slice_margin_s=0.02) is old
    assert choose_plan([]) is None


def test_choose_plan_respects_tpot_and_ties_go_to_fewer_units():
    slow_step = PlanView(None, ServeMode.STREAM, 0.0, 0.1, step_s=0.5, is_new_slice=True, units=1)
    ok = PlanView(None, ServeMode.STREAM, 0.0, 0.2, step_s=0.05, is_new_slice=True, units=2)
    assert choose_plan([slow_step, ok], tpot_slo_s=0.1) is ok
    big = PlanView(None, ServeMode.STREAM, 0.0, 0.2, is_new_slice=True, units=7)
    small = PlanView(None, ServeMode.STREAM, 0.0, 0.2, is_new_slice=True, units=1)
    assert choose_plan([big, small]) is small


def test_whole_model_slice_plan_is_no_slower_than_the_loading_baseline():
    """On an idle GPU, the plan for a slice that holds the whole model predicts a TTFT no
    worse than loading at the same memcpy rate and then prefilling from slice memory."""
    from sim.cluster import Gpu

    for family in ("dense-8b", "dense-13b", "moe-a2.7b", "moe-8x7b"):
        spec = make_spec(family, family)
        for name in ("3g.48gb", "7g.96gb"):
            prof = PROFILES[name]
            if max_rho(spec, prof) < 1.0:
                continue
            gpu = Gpu(0, SLLM_LOADER_GBPS, 7)
            plan = plan_for(spec, 1024, prof, gpu, 0.0, prof.usable_bytes, 0.0, SLLM_LOADER_GBPS, 512, None)
            load_then_prefill = spec.weight_bytes / (SLLM_LOADER_GBPS * 1e9) + prefill_s(
                spec, prof, 1024, 1.0, prof.link_cap_gbps, 512)
            assert predicted_ttft_s(plan) <= load_then_prefill * 1.0001, (family, name)


def test_plans_make_cold_starts_faster_in_the_simulator():
    """Side by side on one small trace: plans on vs off (the ablation)."""
    cfg = SimConfig(num_gpus=6, num_models=30, duration_s=240.0, rate_rps=3.0, seed=3)
    catalog, trace = make_inputs(cfg)
    on = run_system("c2cserve", cfg, catalog, trace)
    off = run_system("c2cserve", SimConfig(**{**cfg.__dict__, "plans": False}), catalog, trace)
    assert on["cold_dense_count"] > 0
    assert on["cold_dense_p50_s"] <= off["cold_dense_p50_s"]
    assert on["slo_attainment"] >= off["slo_attainment"] - 0.01
