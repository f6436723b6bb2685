"""CUDA HybridGEMM backend: host-mapped weights + a device cache of weight rows, knob ρ.

`HybridWeight` wraps one bf16 weight [N, K] that lives in the host store. The whole
matrix is registered with the driver as mapped host memory (zero-copy: kernels read it
over the link); rows [0, n_dev) are also copied into device memory. ρ = n_dev / N is
the fraction of the weight's bytes served from the cache (see cuda_kernels for why the
split is along rows). `kernels.linear(x, hybrid_weight)` dispatches here.

`DeviceTileCache` owns the device bytes for all cached rows of a slice (configurable
capacity; the KV cache has priority, so the worker may shrink it) and applies one ρ to
every registered weight, capped by capacity. `CudaWeightBackend` is what a worker on a
GPU slice uses: it wraps a model's linear weights and drives the cache.

Only used when a GPU exists (or under NUMBA_ENABLE_CUDASIM=1 in tests, where "mapped"
host memory is a plain device array: the simulator has no mapped memory).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from numba import cuda

import c2c_kernels as kernels
from c2c_kernels import cuda_kernels
from c2c_kernels.cuda_kernels import IS_SIMULATOR

log = logging.getLogger(__name__)

_DEVICEMAP, _READ_ONLY = 0x02, 0x08  # CU_MEMHOSTREGISTER_* flags


def gpu_available() -> bool:
    """A real CUDA device (not the simulator) is usable from this process."""
    return not IS_SIMULATOR and cuda.is_available()


def map_host_array(arr: np.ndarray):
    """A device-visible view of host memory `arr` without copying it (mapped, pinned).

    Registered read-only first (kernels only read weights, and the host store's pages
    are a read-only mapping, which plain cuda.mapped/mempin registration rejects);
    falls back to numba's mempin. Raises CudaDriverError when the driver refuses both.
    In the simulator: a device copy (it has no mapped memory).
    """
    if IS_SIMULATOR:
        return cuda.to_device(arr)
    from numba.cuda.cudadrv import devicearray
    from numba.cuda.cudadrv import driver as drv

    ctx = cuda.current_context()
    ptr, size = arr.ctypes.data, arr.nbytes
    try:
        drv.driver.cuMemHostRegister(ptr, size, _DEVICEMAP | _READ_ONLY)
    except drv.CudaAPIError as exc:
        log.info("read-only host registration refused (%s); using mempin", exc)
        pm = ctx.mempin(arr, ptr, size, mapped=True)
    else:
        pm = drv.MappedMemory(
            ctx, ptr, size, owner=arr, finalizer=lambda: drv.driver.cuMemHostUnregister(ptr)
        )
    return devicearray.from_array_like(arr, gpu_data=pm)


_dummies: dict[int, object] = {}


def _empty_part(k_words: int):
    """A [1, K4/4] placeholder for a weight part with no rows (kernels never read it)."""
    if k_words not in _dummies:
        _dummies[k_words] = cuda.to_device(np.zeros((1, k_words), dtype=np.uint64))
    return _dummies[k_words]


class HybridWeight:
    """One bf16 weight [N, K]: host-mapped in full, rows [0, n_dev) also on the device."""

    def __init__(self, w: torch.Tensor, name: str = "", is_mapped: bool = True):
        """is_mapped=False: never read from host memory (the caller caches every row)."""
        if w.dim() != 2 or w.dtype != torch.bfloat16:
            raise ValueError(f"HybridWeight {name!r}: expected a 2-D bf16 tensor, got {w.dtype}")
        self.name = name
        self.shape = tuple(w.shape)
        bits = w.detach().contiguous().view(torch.uint16).numpy()  # [N, K]
        self.host_words = cuda_kernels.as_words(bits)  # [N, K4/4] u64, zero-copy if aligned
        self.k_padded = self.host_words.shape[1] * 4
        # device view of host memory
        self.host_mapped = map_host_array(self.host_words) if is_mapped else None
        self.n_dev = 0
        self.dev_rows = None  # device array [n_dev, K] uint16, or None
        self.path: str | None = None  # "os" | "ws" overrides the choice by M
        self.num_blocks: int | None = None  # cap on blocks launched (slice emulation)

    @property
    def nbytes(self) -> int:
        return self.host_words.nbytes

    @property
    def row_bytes(self) -> int:
        return self.host_words.shape[1] * 8

    @property
    def rho(self) -> float:
        return self.n_dev / self.shape[0] if self.shape[0] else 0.0

    def set_cached_rows(self, n_dev: int) -> None:
        """Cache rows [0, n_dev) in device memory (copying only when the count changes)."""
        n_dev = max(0, min(int(n_dev), self.shape[0]))
        if n_dev == self.n_dev:
            return
        self.dev_rows = cuda.to_device(self.host_words[:n_dev]) if n_dev else None
        self.n_dev = n_dev

    def parts(self):
        """(w_dev, w_host) device arrays for the kernels, placeholders where empty."""
        n_rows, k_words = self.shape[0], self.host_words.shape[1]
        w_dev = self.dev_rows if self.n_dev else _empty_part(k_words)
        w_host = self.host_mapped[self.n_dev :] if self.n_dev < n_rows else _empty_part(k_words)
        return w_dev, w_host

    def choose_path(self, m: int) -> str:
        return self.path or ("os" if m <= kernels.decode_threshold() else "ws")

    def hybrid_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ W.T (+ bias); x [..., K] on the host or the GPU -> [..., N] fp32 alike."""
        lead, k_dim = x.shape[:-1], x.shape[-1]
        if k_dim != self.shape[1]:
            raise ValueError(f"linear: x has K={k_dim} but {self.name!r} has shape {self.shape}")
        x2 = x.detach().reshape(-1, k_dim).to(torch.float32).contiguous()  # [M, K]
        y = self._matmul(x2)  # [M, N] on x's device
        if bias is not None:
            y += bias.to(device=y.device, dtype=torch.float32)
        return y.reshape(*lead, self.shape[0])

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        m, n_rows = x.shape[0], self.shape[0]
        on_gpu = x.is_cuda
        y = torch.empty(m, n_rows, dtype=torch.float32, device=x.device)  # [M, N]
        if m == 0:
            return y
        if self.k_padded != x.shape[1]:
            x = torch.nn.functional.pad(x, (0, self.k_padded - x.shape[1]))  # [M, K4]
        dx = cuda.as_cuda_array(x) if on_gpu else cuda.to_device(x.numpy())
        dy = cuda.as_cuda_array(y) if on_gpu else cuda.device_array((m, n_rows), np.float32)
        self.matmul_device(dx, dy)
        if not on_gpu:
            dy.copy_to_host(y.numpy())
        return y

    def matmul_device(self, x, y, gate=None) -> None:
        """y = x @ W.T on device arrays, no host round trip: x [M, K4] f32, y [M, N] f32
        (a column range of a wider array is fine). gate=(active [1, E] f32 device, index):
        on the output-stationary path, skip the work (y keeps what it held) when
        active[0, index] == 0. Raises ValueError on other shapes."""
        m = x.shape[0]
        if x.shape[1] != self.k_padded or tuple(y.shape) != (m, self.shape[0]):
            raise ValueError(f"matmul_device: x {tuple(x.shape)}, y {tuple(y.shape)} for {self.name!r} "
                             f"of shape {self.shape} (K padded to {self.k_padded})")
        path = self.choose_path(m)
        step = cuda_kernels.OS_CONFIG["max_m"] if path == "os" else m
        w_dev, w_host = self.parts()
        for m0 in range(0, m, step):
            x_part, y_part = x[m0 : m0 + step], y[m0 : m0 + step]
            if gate is not None and path == "os":
                cuda_kernels.launch_gated(*gate, x_part, w_dev, w_host, self.n_dev, y_part, self.num_blocks)
            else:
                cuda_kernels.launch(path, x_part, w_dev, w_host, self.n_dev, y_part, num_blocks=self.num_blocks)


class DeviceTileCache:
    """Device memory for cached weight rows: `capacity_bytes` shared by registered weights."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.weights: dict[str, HybridWeight] = {}
        self.target_rho = 0.0

    def register(self, key: str, weight: HybridWeight) -> None:
        self.weights[key] = weight
        self.set_rho(self.target_rho)

    def unregister_prefix(self, prefix: str) -> None:
        """Drop (and free the device rows of) every weight whose key starts with prefix."""
        for key in [k for k in self.weights if k.startswith(prefix)]:
            self.weights.pop(key).set_cached_rows(0)

    @property
    def total_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    @property
    def used_bytes(self) -> int:
        return sum(w.n_dev * w.row_bytes for w in self.weights.values())

    def cached_fraction(self, prefix: str) -> float:
        """Bytes cached / bytes registered over the weights whose keys start with prefix."""
        weights = [w for k, w in self.weights.items() if k.startswith(prefix)]
        total = sum(w.nbytes for w in weights)
        return sum(w.n_dev * w.row_bytes for w in weights) / total if total else 0.0

    def set_rho(self, rho: float) -> float:
        """Cache fraction rho of every weight's rows, as far as capacity allows.

        Returns the ρ achieved (bytes cached / bytes registered). Raises ValueError when
        rho is outside [0, 1].
        """
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        self.target_rho = rho
        total = self.total_bytes
        fits = self.capacity_bytes / total if total else 1.0
        effective = min(rho, fits)
        for w in self.weights.values():
            w.set_cached_rows(math.floor(effective * w.shape[0]))
        achieved = self.used_bytes / total if total else 0.0
        log.debug("tile cache: rho target %.3f achieved %.3f", rho, achieved)
        return achieved

    def set_capacity(self, capacity_bytes: int) -> float:
        """Resize (e.g. when the KV cache needs the memory) and re-apply the target ρ."""
        self.capacity_bytes = max(0, int(capacity_bytes))
        return self.set_rho(self.target_rho)


def is_streamed_weight(name: str, t: torch.Tensor) -> bool:
    """Linear weights (2-D bf16, not embeddings or norms) go through HybridGEMM."""
    return t.dim() == 2 and t.dtype == torch.bfloat16 and "embed" not in name and "norm" not in name


class CudaWeightBackend:
    """What a worker on a GPU slice uses: host-store weights wrapped as HybridWeights."""

    def __init__(self, cache_bytes: int, num_blocks: int | None = None):
        self.cache = DeviceTileCache(cache_bytes)
        self.num_blocks = num_blocks

    def wrap_weights(self, model_key: str, weights: dict[str, torch.Tensor], is_streamed=is_streamed_weight) -> dict:
        """Same dict with the weights `is_streamed(name, tensor)` picks (default: the linear
        ones) replaced by HybridWeights registered in the tile cache (others unchanged)."""
        out = {}
        for name, t in weights.items():
            if is_streamed(name, t):
                hw = HybridWeight(t, name=name)
                hw.num_blocks = self.num_blocks
                self.cache.register(f"{model_key}/{name}", hw)
                out[name] = hw
            else:
                out[name] = t
        return out

    def drop_model(self, model_key: str) -> None:
        self.cache.unregister_prefix(f"{model_key}/")

    def set_rho(self, rho: float) -> float:
        return self.cache.set_rho(rho)

    def cached_fraction(self, model_key: str) -> float:
        """The ρ a model achieves on this slice: its weight bytes in device memory / all."""
        return self.cache.cached_fraction(f"{model_key}/")

    def set_path(self, path: str | None) -> None:
        """Force "os" or "ws" for every weight (None: choose by M)."""
        for w in self.cache.weights.values():
            w.path = path
