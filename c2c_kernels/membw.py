"""This machine's memory read bandwidth: the roofline for the CPU decode kernels.

A Numba parallel sum over a large array (bigger than the last-level cache), best of a
few runs. Reading is all the GEMV does with its weights, so this is the number its
effective GB/s is compared with.
"""

from __future__ import annotations

import time

import numba as nb
import numpy as np

from c2c_kernels.cpu_gemv import PARALLEL_LOCK


@nb.njit(parallel=True, fastmath=True, cache=True)
def _sum_rows(a):  # a: [R, C] float32; one row per task keeps each thread streaming
    out = np.zeros(a.shape[0], dtype=np.float32)
    for r in nb.prange(a.shape[0]):
        s0 = np.float32(0.0)
        row = a[r]
        for c in range(row.shape[0]):
            s0 += row[c]
        out[r] = s0
    return out


def compile_probe() -> None:
    """Compile (or load from the cache) the probe's one kernel variant."""
    _sum_rows.compile((nb.types.Array(nb.float32, 2, "C"),))


def measure_read_gbps(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in GB/s (1e9 bytes/s) over `num_bytes` of memory.

    Raises MemoryError when the buffer cannot be allocated.
    """
    cols = 1 << 16  # 256 KiB rows
    rows = max(1, num_bytes // (4 * cols))
    a = np.ones((rows, cols), dtype=np.float32)  # touched: pages are really mapped
    best_s = float("inf")
    compile_probe()  # outside the lock: compiling runs no threads
    with PARALLEL_LOCK:
        _sum_rows(a[:2])  # warm outside the timing
        for _ in range(repeats):
            t0 = time.perf_counter()
            _sum_rows(a)
            best_s = min(best_s, time.perf_counter() - t0)
    return a.nbytes / best_s / 1e9
