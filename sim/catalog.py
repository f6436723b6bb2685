"""The simulated model catalog, per-model SLOs and the request trace.

Traffic comes from `bench.workload.generate_trace` (Zipf popularity, bursty Gamma
arrivals with CV > 1, on/off periods, Azure-shaped lengths). Families are drawn per
model with `FAMILY_MIX`, independent of popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.workload import generate_trace
from sim.cost_model import FAMILIES, FAMILY_MIX, PROFILES, ModelSpec, make_spec, step_costs


@dataclass(frozen=True)
class SLOConfig:
    """SLO per model: max(floor, scale x the model's ideal latency on a whole GPU)."""

    ttft_floor_s: float = 1.0
    tpot_floor_s: float = 0.15
    scale: float = 5.0


@dataclass
class Catalog:
    specs: list[ModelSpec]
    ttft_slo_s: list[float]  # per model, for a 1k-token prompt; scaled per request
    tpot_slo_s: list[float]
    ttft_s_per_token: list[float]  # ideal prefill seconds per prompt token (whole GPU)
    slo: SLOConfig = SLOConfig()

    def ttft_slo_for(self, model: int, prompt_tokens: int) -> float:
        """TTFT SLO of one request: scale x ideal prefill of its prompt, at least the floor."""
        return max(self.slo.ttft_floor_s, self.slo.scale * self.ttft_s_per_token[model] * prompt_tokens)


def build_catalog(num_models: int, seed: int = 0, slo: SLOConfig = SLOConfig(), families: list[str] | None = None) -> Catalog:
    """`num_models` models; family i drawn from FAMILY_MIX (or cycled through `families`)."""
    rng = np.random.default_rng(seed + 7919)
    names = list(FAMILY_MIX)
    if families:
        chosen = [families[i % len(families)] for i in range(num_models)]
    else:
        probs = np.array([FAMILY_MIX[n] for n in names])
        chosen = [names[i] for i in rng.choice(len(names), size=num_models, p=probs / probs.sum())]
    specs = [make_spec(f"m{i:04d}-{fam}", fam) for i, fam in enumerate(chosen)]
    whole = PROFILES["7g.96gb"]
    ttft, tpot, per_token = [], [], []
    for spec in specs:
        t_decode, _ = step_costs(spec, whole, 1, 1024, 1.0)
        t_prefill, _ = step_costs(spec, whole, 1024, 0, 1.0)
        per_token.append(t_prefill / 1024)
        ttft.append(max(slo.ttft_floor_s, slo.scale * t_prefill))
        tpot.append(max(slo.tpot_floor_s, slo.scale * t_decode))
    return Catalog(specs, ttft, tpot, per_token, slo)


@dataclass
class TraceArrays:
    """The trace as flat arrays (fast to iterate)."""

    t_s: np.ndarray  # [N] float64
    model: np.ndarray  # [N] int
    prompt: np.ndarray  # [N] int
    output: np.ndarray  # [N] int


def make_trace(num_models: int, duration_s: float, rate_rps: float, seed: int = 0,
               max_prompt_tokens: int = 8192, max_output_tokens: int = 2048, cv: float = 2.0,
               on_off: tuple[float, float] | None = (60.0, 120.0), zipf_s: float = 1.0) -> TraceArrays:
    """A bursty multi-model trace from bench.workload, as arrays."""
    trace = generate_trace(num_models, duration_s, rate_rps, seed=seed, zipf_s=zipf_s, cv=cv, on_off=on_off,
                           max_prompt_tokens=max_prompt_tokens, max_output_tokens=max_output_tokens)
    return TraceArrays(
        t_s=np.array([r.t_s for r in trace], dtype=np.float64),
        model=np.array([r.model_index for r in trace], dtype=np.int64),
        prompt=np.array([r.prompt_tokens for r in trace], dtype=np.int64),
        output=np.array([r.output_tokens for r in trace], dtype=np.int64),
    )


def family_names() -> list[str]:
    return list(FAMILIES)
