"""The paper-style table: cold starts, SLO attainment with / without link contention,
GPUs needed for the SLO target. Pure formatting and small searches over `sim.run`."""

from __future__ import annotations

import math
from dataclasses import replace

from placer.plan import choose_plan, predicted_ttft_s
from sim.cluster import Gpu
from sim.cost_model import (
    C2C_EFFICIENCY,
    C2C_GBPS,
    FAMILIES,
    PROFILES,
    UNITS_PER_GPU,
    make_spec,
    max_rho,
    smallest_fitting_profile,
    step_time,
    streaming_profile,
)
from sim.planning import plan_for, plan_profiles
from sim.run import SimConfig, make_inputs, run_system


def isolated_cold_starts(cfg: SimConfig, prompt_tokens: int = 1024) -> list[dict]:
    """TTFT of one cold request on an idle GPU, per family (cost model only).

    c2cserve: the plan `placer.plan.choose_plan` picks among new slices from the model's
    streaming profile up to the smallest that holds it whole, nothing cached, streaming
    while the copy engines fill the slice (progressive caching). Baseline: load the whole
    model at the loader rate plus init, then prefill with every weight in HBM.
    """
    rows = []
    for family in FAMILIES:
        spec = make_spec(family, family)
        fit = smallest_fitting_profile(spec)
        if fit is None:
            continue
        c_name, c2c_s = _c2c_isolated(spec, cfg, prompt_tokens, fit)
        b_prof = PROFILES[fit]
        load_s = cfg.sllm_init_s + spec.weight_bytes / (cfg.sllm_loader_gbps * 1e9)
        base_s = load_s + step_time(spec, b_prof, prompt_tokens, 0, 1.0, b_prof.link_cap_gbps)
        rows.append(dict(family=family, is_moe=spec.is_moe, weight_gb=round(spec.weight_bytes / 1e9, 1),
                         c2c_profile=c_name, c2c_s=c2c_s, sllm_profile=fit, sllm_s=base_s,
                         speedup=base_s / c2c_s, c2c_rho_warm=round(max_rho(spec, PROFILES[c_name]), 2)))
    return rows


def _c2c_isolated(spec, cfg: SimConfig, prompt_tokens: int, whole: str) -> tuple[str, float]:
    """(profile, predicted TTFT) of c2cserve's plan for one cold request on an idle GPU."""
    names = plan_profiles(streaming_profile(spec, cfg.slo.tpot_floor_s), whole)
    gpu = Gpu(0, cfg.link_gbps, UNITS_PER_GPU)
    plans = [plan_for(spec, prompt_tokens, PROFILES[n], gpu, 0.0, PROFILES[n].usable_bytes, 0.0,
                      C2C_GBPS * C2C_EFFICIENCY, cfg.chunk, None) for n in names]
    best = choose_plan(plans)
    return names[plans.index(best)], predicted_ttft_s(best)


SWEEP_LOADER_GBPS = (375.0, 55.0, 25.0)  # C2C memcpy; PCIe Gen5 x16; PCIe Gen4 x16 (~25 GB/s)


def loader_sweep(cfg: SimConfig, loaders=SWEEP_LOADER_GBPS) -> dict:
    """Isolated cold-start speedup per family as the baseline's loader slows down."""
    rows: dict[str, dict] = {}
    for gbps in loaders:
        for row in isolated_cold_starts(replace(cfg, sllm_loader_gbps=gbps)):
            rows.setdefault(row["family"], {})[f"{gbps:g}"] = round(row["speedup"], 2)
    return {"loader_gbps": [f"{g:g}" for g in loaders], "speedup": rows}


def gpus_needed(system: str, cfg: SimConfig, target: float, lo: int, hi: int, progress_cb=None) -> dict:
    """Smallest GPU count in [lo, hi] whose run reaches `target` SLO attainment (bisection;
    assumes attainment grows with GPUs). `found` False when even `hi` misses."""
    catalog, trace = make_inputs(cfg)
    tried: dict[int, float] = {}

    def attain(num_gpus: int) -> float:
        if num_gpus not in tried:
            summary = run_system(system, replace(cfg, num_gpus=num_gpus), catalog, trace)
            tried[num_gpus] = summary["slo_attainment"]
            if progress_cb:
                progress_cb(system, num_gpus, tried[num_gpus])
        return tried[num_gpus]

    if attain(hi) < target:
        return dict(system=system, gpus=None, found=False, hi=hi, tried=tried)
    while lo < hi:
        mid = (lo + hi) // 2
        if attain(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return dict(system=system, gpus=hi, found=True, hi=hi, tried=tried)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(result: dict) -> str:
    """Markdown tables from the summary dict `sim.cli` builds."""
    lines = [f"## c2cserve sim: {result['config_line']}", ""]
    runs = result["runs"]
    c2c, sllm = runs.get("c2cserve"), runs.get("serverlessllm")
    if c2c and sllm:
        lines += ["### Cold-start TTFT on the trace (requests that found their model cold)", "",
                  "| kind | c2cserve p50 / p99 (s) | ServerlessLLM-like p50 / p99 (s) | ratio p50 / p99 | cold requests c2c / sllm |",
                  "|---|---|---|---|---|"]
        for kind in ("dense", "moe"):
            c50, c99 = c2c[f"cold_{kind}_p50_s"], c2c[f"cold_{kind}_p99_s"]
            s50, s99 = sllm[f"cold_{kind}_p50_s"], sllm[f"cold_{kind}_p99_s"]
            lines.append(f"| {kind} | {_fmt(c50)} / {_fmt(c99)} | {_fmt(s50)} / {_fmt(s99)} | "
                         f"{_ratio(s50, c50)} / {_ratio(s99, c99)} | {c2c[f'cold_{kind}_count']} / {sllm[f'cold_{kind}_count']} |")
        lines.append("")
    if result.get("isolated"):
        lines += ["### Isolated cold start (one 1k-token request, idle GPU, cost model)", "",
                  "| family | GB | c2cserve slice | c2cserve TTFT (s) | baseline slice | baseline TTFT (s) | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["isolated"]:
            lines.append(f"| {row['family']} | {row['weight_gb']} | {row['c2c_profile']} | {_fmt(row['c2c_s'])} | "
                         f"{row['sllm_profile']} | {_fmt(row['sllm_s'])} | {row['speedup']:.2f}x |")
        lines.append("")
    if result.get("loader_sweep"):
        sweep = result["loader_sweep"]
        lines += ["### Isolated cold-start speedup vs the baseline's loader rate (GB/s), init 0", "",
                  "| family | " + " | ".join(sweep["loader_gbps"]) + " |", "|---|" + "---|" * len(sweep["loader_gbps"])]
        for family, by_rate in sweep["speedup"].items():
            lines.append(f"| {family} | " + " | ".join(f"{by_rate[g]:.2f}x" for g in sweep["loader_gbps"]) + " |")
        lines.append("")
    lines += ["### SLO attainment (fraction of all requests; rejected = missed)", "",
              "| system | link | TTFT | TPOT | both | TTFT p50 / p99 (s) | TPOT p50 / p99 (s) | rejected | wall (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in list(runs.values()) + list(result.get("no_contention", {}).values()):
        lines.append(f"| {run['system']} | {run['link']} | {_fmt(run['ttft_attainment'])} | {_fmt(run['tpot_attainment'])} | "
                     f"{_fmt(run['slo_attainment'])} | {_fmt(run['ttft_p50_s'])} / {_fmt(run['ttft_p99_s'])} | "
                     f"{_fmt(run['tpot_p50_s'])} / {_fmt(run['tpot_p99_s'])} | {run['num_rejected']} | {run['wall_s']} |")
    lines.append("")
    if result.get("search"):
        search = result["search"]
        lines += [f"### GPUs needed for {search['target']:.0%} SLO attainment ({search['config_line']})", "",
                  "| system | GPUs | runs (GPUs: attainment) |", "|---|---|---|"]
        for row in search["rows"]:
            gpus = row["gpus"] if row["found"] else f"> {row['hi']}"
            tried = ", ".join(f"{g}: {a:.3f}" for g, a in sorted(row["tried"].items(), key=lambda ga: int(ga[0])))
            lines.append(f"| {row['system']} | {gpus} | {tried} |")
        lines.append("")
    return "\n".join(lines)
