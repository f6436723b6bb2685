"""`c2cserve sim`: replay one trace on a simulated GH200 cluster for each system.

Prints the paper-style table (cold starts, SLO attainment with and without link
contention, GPUs needed for the SLO target); `--json` prints the summary as JSON;
`--out DIR` also writes summary.json and table.md there.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from services.errors import InvalidRequest
from sim.catalog import SLOConfig
from sim.cost_model import (
    C2C_EFFICIENCY,
    C2C_GBPS,
    SLLM_INIT_S,
    SLLM_LOADER_GBPS,
    STREAM_EFFICIENCY,
    STREAM_EFFICIENCY_SOURCE,
)
from sim.report import format_table, gpus_needed, isolated_cold_starts, loader_sweep
from sim.run import SYSTEMS, SimConfig, make_inputs, run_system


def add_arguments(parser) -> None:
    parser.add_argument("--gpus", type=int, default=100, help="GH200 GPUs (one per node)")
    parser.add_argument("--slices-per-gpu", type=int, default=7,
                        help="1g.12gb MIG slices per GPU at start (1..7); bigger profiles are formed on demand")
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--rate", type=float, default=40.0, help="mean requests/s over all models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--link-gbps", type=float, default=C2C_GBPS * C2C_EFFICIENCY,
                        help="usable link per GPU (default: C2C 450 GB/s x measured memcpy efficiency)")
    parser.add_argument("--sllm-loader-gbps", type=float, default=SLLM_LOADER_GBPS)
    parser.add_argument("--sllm-init-s", type=float, default=SLLM_INIT_S)
    parser.add_argument("--ttft-slo-s", type=float, default=1.0, help="TTFT SLO floor")
    parser.add_argument("--tpot-slo-s", type=float, default=0.15, help="TPOT SLO floor")
    parser.add_argument("--slo-scale", type=float, default=5.0, help="SLO = max(floor, scale x ideal on a whole GPU)")
    parser.add_argument("--skip-no-contention", action="store_true",
                        help="skip the extra c2cserve run with an infinite link")
    parser.add_argument("--no-search", action="store_true",
                        help="skip the search for the GPU count each system needs for --target")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--search-duration-s", type=float, default=600.0)
    parser.add_argument("--search-max-gpus", type=int, default=0, help="upper end of the search (default 3 x --gpus)")
    parser.add_argument("--no-prewarm", action="store_true")
    parser.add_argument("--no-control", action="store_true")
    parser.add_argument("--no-plans", action="store_true",
                        help="c2cserve streams only (no progressive caching, no whole-model slices): the ablation")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--out", default=None, help="folder for summary.json and table.md")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> SimConfig:
    if args.gpus <= 0 or args.models <= 0 or args.duration_s <= 0 or args.rate <= 0:
        raise InvalidRequest("--gpus, --models, --duration-s and --rate must be positive")
    if not 1 <= args.slices_per_gpu <= 7:
        raise InvalidRequest(f"--slices-per-gpu must be 1..7 (MIG), got {args.slices_per_gpu}")
    if args.link_gbps <= 0 or args.sllm_loader_gbps <= 0:
        raise InvalidRequest("--link-gbps and --sllm-loader-gbps must be positive")
    return SimConfig(num_gpus=args.gpus, num_models=args.models, duration_s=args.duration_s,
                     rate_rps=args.rate, seed=args.seed, link_gbps=args.link_gbps,
                     sllm_loader_gbps=args.sllm_loader_gbps, sllm_init_s=args.sllm_init_s,
                     prewarm=not args.no_prewarm, control=not args.no_control, plans=not args.no_plans,
                     initial_slices=args.slices_per_gpu,
                     slo=SLOConfig(args.ttft_slo_s, args.tpot_slo_s, args.slo_scale))


def parse_systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        raise InvalidRequest(f"unknown system(s) {unknown or text!r}; choose from {', '.join(SYSTEMS)}")
    return names


def _progress(total: int, desc: str, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=disabled, leave=False)


def config_line(cfg: SimConfig) -> str:
    link = "inf" if cfg.link_gbps == math.inf else f"{cfg.link_gbps:.0f}"
    return (f"{cfg.num_gpus} GPUs x {cfg.initial_slices} slices, {cfg.num_models} models, {cfg.duration_s:.0f} s, "
            f"{cfg.rate_rps} req/s, seed {cfg.seed}, link {link} GB/s, "
            f"baseline loader {cfg.sllm_loader_gbps:.0f} GB/s + {cfg.sllm_init_s:g} s init")


def run(args) -> int:
    cfg = config_from_args(args)
    systems = parse_systems(args.systems)
    started = time.perf_counter()
    catalog, trace = make_inputs(cfg)
    result: dict = {"config": _config_dict(cfg), "config_line": config_line(cfg),
                    "stream_efficiency": [STREAM_EFFICIENCY, STREAM_EFFICIENCY_SOURCE],
                    "num_requests": int(len(trace.t_s)), "runs": {}, "no_contention": {}}
    for name in systems:
        with _progress(len(trace.t_s), name, args.no_progress) as bar:
            result["runs"][name] = run_system(name, cfg, catalog, trace, bar)
    if not args.skip_no_contention and "c2cserve" in systems:
        with _progress(len(trace.t_s), "c2cserve (no contention)", args.no_progress) as bar:
            result["no_contention"]["c2cserve"] = run_system("c2cserve", replace(cfg, link_gbps=math.inf), catalog, trace, bar)
    result["isolated"] = isolated_cold_starts(cfg)
    result["loader_sweep"] = loader_sweep(cfg)
    if not args.no_search:
        result["search"] = _search(cfg, systems, args)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    _emit(result, args)
    return 0


def _search(cfg: SimConfig, systems: list[str], args) -> dict:
    search_cfg = replace(cfg, duration_s=min(cfg.duration_s, args.search_duration_s))
    hi = args.search_max_gpus or 3 * cfg.num_gpus

    def note(system, num_gpus, attainment):
        if not args.no_progress:
            print(f"  search {system}: {num_gpus} GPUs -> {attainment:.3f}", file=sys.stderr)

    rows = [gpus_needed(name, search_cfg, args.target, 1, hi, note) for name in systems]
    return {"target": args.target, "config_line": config_line(search_cfg), "rows": rows}


def _emit(result: dict, args) -> None:
    eff, source = result["stream_efficiency"]
    table = format_table(result) + f"\nstreaming kernels reach {eff:.2f} of their link share ({source})\n"
    table += f"total wall time: {result['wall_s']} s\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "table.md").write_text(table)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(table)


def _config_dict(cfg: SimConfig) -> dict:
    out = dict(vars(cfg))
    out["slo"] = vars(cfg.slo)
    out["link_gbps"] = "inf" if cfg.link_gbps == math.inf else cfg.link_gbps
    return out
