"""Summaries of a simulation run: SLO attainment, cold-start latency, link use."""

from __future__ import annotations

import numpy as np

from sim.cluster import Request
from sim.cost_model import ModelSpec


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def request_ok(req: Request) -> tuple[bool, bool]:
    """(TTFT within SLO, TPOT within SLO); a rejected request meets neither."""
    if req.rejected or req.t_done is None:
        return False, False
    ttft_ok = req.t_first - req.t_arrival <= req.ttft_slo
    if req.output <= 1:
        return ttft_ok, True
    tpot = (req.t_done - req.t_first) / (req.output - 1)
    return ttft_ok, tpot <= req.tpot_slo


def summarize(requests: list[Request], specs: list[ModelSpec]) -> dict:
    """Attainment (TTFT, TPOT, both) over all requests; cold starts split dense / MoE."""
    num = len(requests)
    ttft_ok = tpot_ok = both_ok = 0
    ttfts, tpots = [], []
    cold = {"dense": [], "moe": []}
    for req in requests:
        a, b = request_ok(req)
        ttft_ok += a
        tpot_ok += b
        both_ok += a and b
        if req.t_first is None:
            continue
        ttft = req.t_first - req.t_arrival
        ttfts.append(ttft)
        if req.output > 1 and req.t_done is not None:
            tpots.append((req.t_done - req.t_first) / (req.output - 1))
        if req.is_cold:
            cold["moe" if specs[req.model].is_moe else "dense"].append(ttft)
    out = {
        "num_requests": num,
        "num_finished": sum(1 for r in requests if r.t_done is not None),
        "num_rejected": sum(1 for r in requests if r.rejected),
        "ttft_attainment": ttft_ok / num if num else None,
        "tpot_attainment": tpot_ok / num if num else None,
        "slo_attainment": both_ok / num if num else None,
        "ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),
        "tpot_p50_s": _pct(tpots, 50), "tpot_p99_s": _pct(tpots, 99),
    }
    for kind, values in cold.items():
        out[f"cold_{kind}_count"] = len(values)
        out[f"cold_{kind}_p50_s"] = _pct(values, 50)
        out[f"cold_{kind}_p99_s"] = _pct(values, 99)
    return out
