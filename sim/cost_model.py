"""Cost model of the simulated cluster: hardware constants, MIG profiles, model shapes.

Every constant names its source in `docs/cost_model.md` (public figure, our benchmark,
or "assumed"). Units are in the names. Step time of one model's step on an instance:

    t = max(host_bytes / link_gbps, hbm_bytes / hbm_gbps, flops / flops_eff) + overhead

host and HBM reads overlap (HybridGEMM reads both at once); compute overlaps memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9
GIB = 1024**3

# ---- GH200 (Hopper H100 die, 96 GB HBM3) -------------------------------------------
C2C_GBPS = 450.0  # NVLink-C2C, per direction (NVIDIA GH200 datasheet)
C2C_EFFICIENCY = 375.0 / 450.0  # best measured H2D memcpy 340-375 GB/s (public GH200 reports)
HBM_GBPS = 4000.0  # GH200 HBM3, 4 TB/s (datasheet)
HBM_BYTES = 96 * GB  # GH200 96 GB HBM3 (datasheet)
NUM_SMS = 132  # H100 SXM5 / GH200 (datasheet)
BF16_TFLOPS = 989.0  # H100 SXM dense BF16 (datasheet)
GEMM_EFFICIENCY = 0.6  # achieved / peak for prefill GEMMs (assumed)
HOST_READ_GBPS_PER_SM = 10.0  # host reads a kernel sustains per SM over C2C (assumed)
STEP_OVERHEAD_S = 0.002  # launch + sampling + scheduling per step (assumed)
PCIE5_GBPS = 55.0  # PCIe Gen5 x16 measured ~55-64 GB/s/dir (public); the sensitivity loader rate

# Fraction of the available bandwidth a streaming GEMV reaches: the median %roof (rows
# capped at 100%) of the 8 M=1 decode rows of `c2cserve bench kernels` in
# bench/results/kernels_cpu.txt, i.e. how close our output-stationary kernel gets to the
# memory roofline. An input of the model, documented here; re-measure and update it when
# the kernels change (docs/cost_model.md).
STREAM_EFFICIENCY = 0.80
STREAM_EFFICIENCY_SOURCE = "median of the 8 M=1 rows of bench/results/kernels_cpu.txt"

# ---- serverless baseline -------------------------------------------------------------
SLLM_LOADER_GBPS = C2C_GBPS * C2C_EFFICIENCY  # generous: loads at the measured memcpy rate
SLLM_INIT_S = 0.0  # engine init per cold start (0 = generous; ServerlessLLM pre-starts)


@dataclass(frozen=True)
class Profile:
    """A MIG profile: a share of the GPU's SMs, memory and memory bandwidth."""

    name: str
    units: int  # compute slices out of 7
    mem_slices: int  # memory slices out of 8
    sms: int
    usable_bytes: float  # HBM usable by the instance (weights + KV)

    @property
    def hbm_gbps(self) -> float:
        return HBM_GBPS * self.mem_slices / 8

    @property
    def flops(self) -> float:
        return BF16_TFLOPS * 1e12 * GEMM_EFFICIENCY * self.sms / NUM_SMS

    @property
    def link_cap_gbps(self) -> float:
        """Most host bandwidth this instance's kernels can pull alone."""
        return min(C2C_GBPS * C2C_EFFICIENCY, HOST_READ_GBPS_PER_SM * self.sms)


# H100 96GB / GH200 MIG profiles (NVIDIA MIG user guide); usable ~ 93% of nominal.
PROFILES: dict[str, Profile] = {
    "1g.12gb": Profile("1g.12gb", 1, 1, 16, 11 * GIB),
    "2g.24gb": Profile("2g.24gb", 2, 2, 32, 22 * GIB),
    "3g.48gb": Profile("3g.48gb", 3, 4, 60, 44 * GIB),
    "4g.48gb": Profile("4g.48gb", 4, 4, 64, 44 * GIB),
    "7g.96gb": Profile("7g.96gb", 7, 8, 132, 88 * GIB),
}
PROFILE_ORDER = ["1g.12gb", "2g.24gb", "3g.48gb", "4g.48gb", "7g.96gb"]
UNITS_PER_GPU = 7


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one model, enough to cost its steps."""

    model_id: str
    family: str  # size class, e.g. "dense-8b", "moe-8x7b"
    is_moe: bool
    total_params: float
    bytes_per_param: float  # 2 = bf16, 1 = fp8
    num_layers: int
    kv_bytes_per_token: float
    num_experts: int = 0
    experts_per_token: int = 0
    expert_params: float = 0.0  # all experts of all layers

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    @property
    def active_params(self) -> float:
        if not self.is_moe:
            return self.total_params
        shared = self.total_params - self.expert_params
        return shared + self.expert_params * self.experts_per_token / self.num_experts

    def step_weight_bytes(self, num_tokens: int) -> float:
        """Bytes of weights a step over `num_tokens` tokens reads (each byte once)."""
        if not self.is_moe or num_tokens <= 0:
            return self.weight_bytes
        # expected distinct experts touched per layer by num_tokens independent top-k picks
        miss = (1.0 - self.experts_per_token / self.num_experts) ** num_tokens
        touched = self.num_experts * (1.0 - miss)
        shared = self.total_params - self.expert_params
        expert_bytes = self.expert_params * touched / self.num_experts
        return (shared + expert_bytes) * self.bytes_per_param

    def flops(self, num_tokens: int) -> float:
        return 2.0 * self.active_params * num_tokens


def kv_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> float:
    return 2.0 * num_layers * num_kv_heads * head_dim * dtype_bytes


# family -> (ModelSpec fields minus model_id/family); public configs of similar models
FAMILIES: dict[str, dict] = {
    "dense-1b": dict(is_moe=False, total_params=1.24e9, bytes_per_param=2, num_layers=16,
                     kv_bytes_per_token=kv_per_token(16, 8, 64)),  # Llama-3.2-1B
    "dense-3b": dict(is_moe=False, total_params=3.21e9, bytes_per_param=2, num_layers=28,
                     kv_bytes_per_token=kv_per_token(28, 8, 128)),  # Llama-3.2-3B
    "dense-8b": dict(is_moe=False, total_params=8.03e9, bytes_per_param=2, num_layers=32,
                     kv_bytes_per_token=kv_per_token(32, 8, 128)),  # Llama-3.1-8B
    "dense-13b": dict(is_moe=False, total_params=13.0e9, bytes_per_param=2, num_layers=40,
                      kv_bytes_per_token=kv_per_token(40, 8, 128)),  # Llama-2-13B shape, GQA 8
    "dense-34b": dict(is_moe=False, total_params=34.0e9, bytes_per_param=1, num_layers=48,
                      kv_bytes_per_token=kv_per_token(48, 8, 128)),  # CodeLlama-34B, fp8
    "dense-70b": dict(is_moe=False, total_params=70.6e9, bytes_per_param=1, num_layers=80,
                      kv_bytes_per_token=kv_per_token(80, 8, 128)),  # Llama-3.1-70B, fp8
    "moe-a2.7b": dict(is_moe=True, total_params=14.3e9, bytes_per_param=2, num_layers=24,
                      kv_bytes_per_token=kv_per_token(24, 16, 128), num_experts=60,
                      experts_per_token=4, expert_params=12.9e9),  # Qwen1.5-MoE-A2.7B
    "moe-8x7b": dict(is_moe=True, total_params=46.7e9, bytes_per_param=1, num_layers=32,
                     kv_bytes_per_token=kv_per_token(32, 8, 128), num_experts=8,
                     experts_per_token=2, expert_params=45.1e9),  # Mixtral-8x7B, fp8
}

# share of the catalog per family (assumed: many small fine-tunes, few big models)
FAMILY_MIX: dict[str, float] = {
    "dense-1b": 0.20, "dense-3b": 0.20, "dense-8b": 0.28, "dense-13b": 0.10,
    "dense-34b": 0.05, "dense-70b": 0.03, "moe-a2.7b": 0.08, "moe-8x7b": 0.06,
}


def make_spec(model_id: str, family: str) -> ModelSpec:
    return ModelSpec(model_id=model_id, family=family, **FAMILIES[family])


def kv_reserve_bytes(spec: ModelSpec, num_tokens: int = 8192) -> float:
    """KV space an instance keeps for a model's batch (assumed 8k tokens in flight)."""
    return spec.kv_bytes_per_token * num_tokens


def step_costs(spec: ModelSpec, prof: Profile, num_tokens: int, ctx_tokens: float, rho: float) -> tuple[float, float]:
    """(time with an unlimited link, host bytes) of one step of `num_tokens` tokens.

    `ctx_tokens` is the KV the step's attention reads (sum over decoding sequences).
    """
    weight_bytes = spec.step_weight_bytes(num_tokens)
    hbm_bytes = rho * weight_bytes + spec.kv_bytes_per_token * ctx_tokens
    t_mem = hbm_bytes / (prof.hbm_gbps * GB)
    t_compute = spec.flops(num_tokens) / prof.flops
    return max(t_mem, t_compute) + STEP_OVERHEAD_S, (1.0 - rho) * weight_bytes


def step_time(spec: ModelSpec, prof: Profile, num_tokens: int, ctx_tokens: float, rho: float, link_gbps: float) -> float:
    """Seconds of one step when the instance streams host bytes at `link_gbps`."""
    t0, host_bytes = step_costs(spec, prof, num_tokens, ctx_tokens, rho)
    if host_bytes <= 0:
        return t0
    if link_gbps <= 0:
        return math.inf
    return max(t0, host_bytes / (link_gbps * STREAM_EFFICIENCY * GB) + STEP_OVERHEAD_S)


def max_rho(spec: ModelSpec, prof: Profile) -> float:
    """Largest cached fraction an instance of `prof` holds for `spec` next to its KV."""
    room = prof.usable_bytes - kv_reserve_bytes(spec)
    return max(0.0, min(1.0, room / spec.weight_bytes))


def smallest_fitting_profile(spec: ModelSpec) -> str | None:
    """Smallest profile whose memory holds all weights plus the KV reserve (loading systems)."""
    for name in PROFILE_ORDER:
        if PROFILES[name].usable_bytes >= spec.weight_bytes + kv_reserve_bytes(spec):
            return name
    return None


def fair_link_gbps(prof: Profile) -> float:
    """The link share of an instance when every slice of its GPU streams (per unit)."""
    return min(prof.link_cap_gbps, C2C_GBPS * C2C_EFFICIENCY * prof.units / UNITS_PER_GPU)


def streaming_profile(spec: ModelSpec, tpot_slo_s: float, margin: float = 0.8) -> str:
    """Smallest profile where a streamed decode step (rho at its max) at the fair link
    share takes at most `margin` x the TPOT SLO; the largest profile when none does."""
    for name in PROFILE_ORDER:
        prof = PROFILES[name]
        t = step_time(spec, prof, 1, 1024, max_rho(spec, prof), fair_link_gbps(prof))
        if t <= margin * tpot_slo_s:
            return name
    return PROFILE_ORDER[-1]


def prefill_profile(spec: ModelSpec, prompt_tokens: int, ttft_slo_s: float, at_least: str, margin: float = 0.5) -> str:
    """Smallest profile (not below `at_least`) that prefills the prompt in one chunk within
    `margin` x the TTFT SLO at the fair link share; the largest profile when none does."""
    for name in PROFILE_ORDER[PROFILE_ORDER.index(at_least):]:
        prof = PROFILES[name]
        t = step_time(spec, prof, prompt_tokens, 0, max_rho(spec, prof), fair_link_gbps(prof))
        if t <= margin * ttft_slo_s:
            return name
    return PROFILE_ORDER[-1]
