"""CPU prefill path (large M): bf16 matmul on AMX where the CPU has it, else exact fp32.

Two kinds of maths (`prefill_math()`, knob C2C_PREFILL_MATH=auto|exact|bf16, read per call):
- "bf16" (the default where /proc/cpuinfo lists `amx_bf16`): x is rounded to bf16 and
  torch's bf16 GEMM runs (oneDNN, which uses the AMX tile units there), fp32
  accumulation; the product is rounded to bf16 once more on the way out, then widened.
  About 3 significant digits of each activation, as transformers and vLLM's CPU
  backend compute in bf16. fp16 weights stay exact (AMX-FP16 is another CPU feature).
- "exact": fp32 activations, exact widening of the bf16/fp16 weights, fp32 FMA; the
  fastest of these candidates, chosen per shape:
  - "numba_ws": `cpu_gemv.gemm_ws`, weight panels read once and widened in registers;
  - "torch_upcast": widen the whole weight to fp32 then MKL sgemm (`F.linear`).
  Without AMX, oneDNN's bf16 GEMM can be several times slower than either (AVX2 Zen 3,
  2 threads: 10-19 GFLOP/s against 54-108), so "auto" means exact there.

The first exact call for a shape key (M bucket, N, K, weight dtype) times every
candidate once and remembers the fastest (`_choice`); later calls go straight to it. Set
`C2C_PREFILL_KERNEL=numba_ws|torch_upcast|torch_bf16` to force one (an unknown name
raises InvalidRequest at first use).

Decisions persist in a JSON file (`C2C_AUTOTUNE_FILE`, default
~/.cache/c2cserve/prefill_autotune.json; empty turns it off), keyed by the CPU model
and thread count too, so a fresh worker process does not re-time shapes another
already timed: autotuning is part of a cold start's latency (~9 ms for a 4-layer toy
model, more for real ones). A missing, unreadable or corrupt file only means retuning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from c2c_kernels.cpu_gemv import PARALLEL_LOCK, gemm_ws
from services.errors import InvalidRequest

# Tiles of gemm_ws: a weight panel [N_BLOCK, K_BLOCK] (bf16: 128 KiB) stays in L2 while
# every M_BLOCK rows of x ([M_BLOCK, K_BLOCK] fp32: 64 KiB) pass over it. Long K blocks
# mean fewer read-modify-write passes over y. Measured on one Zen 4 core (M=128):
# 64/1024/16 at 81-97 GFLOP/s, the best of 15 tilings tried (128/512/16: 60-74).
N_BLOCK, K_BLOCK, M_BLOCK = 64, 1024, 16

_choice: dict[tuple[int, int, int, str], str] = {}
_loaded_from: str | None = None  # the file _choice was last filled from
# Part of every saved key: bump when a candidate's code changes, so old timings lapse.
TUNE_VERSION = 1
logger = logging.getLogger(__name__)


def _numba_ws(x: torch.Tensor, w: torch.Tensor, w16: np.ndarray) -> torch.Tensor:
    """x [M, K] f32 contiguous -> y [M, N] f32 (M padded to a multiple of 4 inside)."""
    m, k = x.shape
    m4 = (m + 3) // 4 * 4
    if m4 != m:
        xp = torch.zeros(m4, k, dtype=torch.float32)  # [M4, K]
        xp[:m] = x
        x = xp
    y = torch.empty(m4, w.shape[0], dtype=torch.float32)  # [M4, N]
    with PARALLEL_LOCK:
        gemm_ws(x.numpy(), w16, y.numpy(), numba.get_num_threads(), N_BLOCK, K_BLOCK, M_BLOCK)
    return y[:m]


def _torch_upcast(x: torch.Tensor, w: torch.Tensor, w16: np.ndarray) -> torch.Tensor:
    return F.linear(x, w.to(torch.float32))  # [M, N]


def _torch_bf16(x: torch.Tensor, w: torch.Tensor, w16: np.ndarray) -> torch.Tensor:
    """x rounded to bf16, oneDNN bf16 GEMM (AMX tiles where present), fp32 accumulation."""
    if w.dtype != torch.bfloat16:
        return _torch_upcast(x, w, w16)  # fp16 weights: no AMX-BF16 route, stay exact
    return F.linear(x.to(torch.bfloat16), w).to(torch.float32)  # [M, N]


# The exact candidates, timed against each other per shape.
CANDIDATES: dict[str, Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]] = {
    "numba_ws": _numba_ws,
    "torch_upcast": _torch_upcast,
}
FORCEABLE = {**CANDIDATES, "torch_bf16": _torch_bf16}
PREFILL_MATHS = ("auto", "exact", "bf16")


def cpu_has_amx_bf16() -> bool:
    """True when /proc/cpuinfo's flags list amx_bf16 (Sapphire Rapids and later Xeons)."""
    global _has_amx
    if _has_amx is None:
        _has_amx = "amx_bf16" in _cpu_flags()
    return _has_amx


_has_amx: bool | None = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def prefill_math() -> str:
    """"bf16" or "exact": C2C_PREFILL_MATH, where "auto" (or unset) means bf16 on AMX only.

    Raises InvalidRequest for a value other than auto, exact or bf16.
    """
    value = os.environ.get("C2C_PREFILL_MATH", "").strip().lower() or "auto"
    if value not in PREFILL_MATHS:
        raise InvalidRequest(f"C2C_PREFILL_MATH={value!r} is not one of {list(PREFILL_MATHS)}",
                             param="C2C_PREFILL_MATH")
    if value == "auto":
        return "bf16" if cpu_has_amx_bf16() else "exact"
    return value


def m_bucket(m: int) -> int:
    """Shapes within a power-of-two bucket of M share one choice."""
    return 1 << max(0, (m - 1).bit_length())


def _forced() -> str | None:
    name = os.environ.get("C2C_PREFILL_KERNEL", "").strip() or None
    if name is not None and name not in FORCEABLE:
        raise InvalidRequest(
            f"C2C_PREFILL_KERNEL={name!r} is not one of {sorted(FORCEABLE)}",
            param="C2C_PREFILL_KERNEL",
        )
    return name


def prefill_linear(x: torch.Tensor, w: torch.Tensor, w16: np.ndarray) -> torch.Tensor:
    """y = x @ w.T in fp32 for large M; x [M, K] f32 contiguous, w [N, K] bf16/fp16.

    `w16` is w's numpy bit view (uint16 for bf16, int16 for fp16). Returns [M, N] f32.
    """
    name = _forced()
    if name is None and w.dtype == torch.bfloat16 and prefill_math() == "bf16":
        name = "torch_bf16"
    if name is None:
        _load_choices()
        key = (m_bucket(x.shape[0]), w.shape[0], w.shape[1], str(w.dtype))
        name = _choice.get(key)
        if name is None:
            return _autotune(key, x, w, w16)
    return FORCEABLE[name](x, w, w16)


def _autotune(key, x: torch.Tensor, w: torch.Tensor, w16: np.ndarray) -> torch.Tensor:
    """Time every candidate twice (interleaved) on this call's data; keep the fastest.

    The fastest single run per candidate decides, so a burst of other load during one
    run does not. Returns that candidate's y.
    """
    best_s = dict.fromkeys(CANDIDATES, float("inf"))
    y = {}
    for fn in CANDIDATES.values():
        fn(x[:4], w, w16)  # first use compiles / warms; not part of the timing
    for _ in range(2):
        for name, fn in CANDIDATES.items():
            t0 = time.perf_counter()
            y[name] = fn(x, w, w16)
            best_s[name] = min(best_s[name], time.perf_counter() - t0)
    name = min(best_s, key=best_s.get)
    _choice[key] = name
    _save_choice(key, name)
    return y[name]


def autotune_file() -> Path | None:
    value = os.environ.get("C2C_AUTOTUNE_FILE")
    if value is None:
        return Path("~/.cache/c2cserve/prefill_autotune.json").expanduser()
    return Path(value).expanduser() if value.strip() else None


def _machine_prefix() -> str:
    """CPU model and thread count: a decision holds for that pair only."""
    model = "unknown-cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"v{TUNE_VERSION}|{model}|threads={numba.get_num_threads()}|"


def _file_key(key: tuple[int, int, int, str]) -> str:
    return _machine_prefix() + "|".join(map(str, key))


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _load_choices() -> None:
    """Fill _choice from the file once per file (and again if C2C_AUTOTUNE_FILE changes)."""
    global _loaded_from
    path = autotune_file()
    if path is None or str(path) == _loaded_from:
        return
    _loaded_from = str(path)
    prefix = _machine_prefix()
    for file_key, name in _read(path).items():
        parts = file_key[len(prefix):].split("|") if file_key.startswith(prefix) else []
        if len(parts) == 4 and name in CANDIDATES and all(p.isdigit() for p in parts[:3]):
            _choice.setdefault((int(parts[0]), int(parts[1]), int(parts[2]), parts[3]), name)


def _save_choice(key: tuple[int, int, int, str], name: str) -> None:
    """Merge one decision into the file (write a temp file, then rename: never torn)."""
    path = autotune_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[_file_key(key)] = name
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("could not save prefill autotune decision to %s: %s", path, exc)


def chosen_kernels() -> dict[tuple[int, int, int, str], str]:
    """The autotune decisions so far: (M bucket, N, K, dtype) -> candidate name."""
    return dict(_choice)
