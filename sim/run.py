"""One simulation run: a catalog, a trace, a system and a cluster size -> a summary dict."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from services.errors import InvalidRequest
from sim.baselines import Dedicated, ServerlessLLM, TimeShare
from sim.catalog import Catalog, SLOConfig, TraceArrays, build_catalog, make_trace
from sim.cost_model import C2C_EFFICIENCY, C2C_GBPS, SLLM_INIT_S, SLLM_LOADER_GBPS
from sim.engine import Simulator
from sim.metrics import summarize
from sim.systems import C2CServe

SYSTEMS = ("c2cserve", "serverlessllm", "dedicated", "timeshare")


@dataclass
class SimConfig:
    num_gpus: int = 100
    initial_slices: int = 7  # 1g.12gb slices per GPU at start (c2cserve)
    num_models: int = 500
    duration_s: float = 3600.0
    rate_rps: float = 40.0
    seed: int = 0
    link_gbps: float = C2C_GBPS * C2C_EFFICIENCY  # math.inf: no link contention
    chunk: int = 512
    max_seqs: int = 16
    sllm_loader_gbps: float = SLLM_LOADER_GBPS
    sllm_init_s: float = SLLM_INIT_S
    prewarm: bool = True
    control: bool = True
    plans: bool = True  # c2cserve: choose stream / progressive caching / new slice by predicted TTFT
    slo: SLOConfig = field(default_factory=SLOConfig)
    families: list[str] | None = None
    cv: float = 2.0
    zipf_s: float = 1.0


def make_inputs(cfg: SimConfig) -> tuple[Catalog, TraceArrays]:
    catalog = build_catalog(cfg.num_models, cfg.seed, cfg.slo, cfg.families)
    trace = make_trace(cfg.num_models, cfg.duration_s, cfg.rate_rps, seed=cfg.seed, cv=cfg.cv, zipf_s=cfg.zipf_s)
    return catalog, trace


def make_system(name: str, cfg: SimConfig, trace: TraceArrays):
    if name == "c2cserve":
        return C2CServe(seed=cfg.seed, prewarm=cfg.prewarm, control=cfg.control, plans=cfg.plans)
    if name == "serverlessllm":
        return ServerlessLLM(loader_gbps=cfg.sllm_loader_gbps, init_s=cfg.sllm_init_s)
    if name == "dedicated":
        counts = np.bincount(trace.model, minlength=cfg.num_models)
        return Dedicated(expected_rps=[float(c) / cfg.duration_s for c in counts])
    if name == "timeshare":
        return TimeShare(loader_gbps=cfg.sllm_loader_gbps)
    raise InvalidRequest(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def run_system(name: str, cfg: SimConfig, catalog: Catalog, trace: TraceArrays, progress=None) -> dict:
    """Simulate `name` on the trace; the summary has attainment, cold starts, wall time."""
    system = make_system(name, cfg, trace)
    sim = Simulator(catalog, trace, system, cfg.num_gpus, cfg.link_gbps, cfg.chunk, cfg.max_seqs, progress,
                    initial_slices=cfg.initial_slices)
    start = time.perf_counter()
    requests = sim.run()
    summary = summarize(requests, catalog.specs)
    summary.update(system=name, num_gpus=cfg.num_gpus, wall_s=round(time.perf_counter() - start, 3),
                   num_events=sim.num_events, link="infinite" if cfg.link_gbps == math.inf else cfg.link_gbps)
    return summary
