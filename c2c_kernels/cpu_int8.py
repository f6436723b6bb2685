"""int8 weight-only quantization, per output channel, and its CPU kernels.

A weight w [N, K] (bf16/fp16/fp32) is stored as q [N, K] int8 and scale [N] fp32 with
w[n] ~ q[n] * scale[n], scale[n] = max_k |w[n, k]| / 127, q = round(w / scale) (ties to
even, as torch.round). Activations stay fp32; a product is exact fp32 arithmetic on the
dequantized weights: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k].

Decode (M <= the decode threshold) reads the int8 bytes once (half of bf16's), widening
them in registers (`_dot_i8`: LLVM vectorizes the int8 -> fp32 conversion and the FMA);
prefill dequantizes the matrix to fp32 once per call and runs MKL's sgemm.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

QMAX = 127


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8, scale [N] fp32), symmetric per row."""
    w32 = w.detach().to(torch.float32)
    absmax = w32.abs().amax(dim=1)  # [N]
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    q = torch.round(w32 / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] fp32 = q * scale[:, None] (the float reference the kernels compute with)."""
    return q.to(torch.float32) * scale[:, None]


@nb.njit(fastmath=True, inline="always")
def _dot_i8(wr, x):
    acc = np.float32(0.0)
    for k in range(x.shape[0]):
        acc += np.float32(wr[k]) * x[k]
    return acc


@nb.njit(fastmath=True, inline="always")
def _rows(x, q, scale, y, n0, n1):
    """y[:, n0:n1] = x @ (q[n0:n1] * scale).T; a weight row is read once for all M rows of x."""
    for n in range(n0, n1):
        wr, s = q[n], scale[n]
        for m in range(x.shape[0]):
            y[m, n] = _dot_i8(wr, x[m]) * s


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_int8(x, q, scale, y, num_tasks):
    """y [M, N] = x [M, K] f32 @ dequant(q [N, K] int8, scale [N] f32).T, row ranges in parallel."""
    n_rows = q.shape[0]
    per_task = (n_rows + num_tasks - 1) // num_tasks
    for t in nb.prange(num_tasks):
        _rows(x, q, scale, y, t * per_task, min(n_rows, (t + 1) * per_task))


@nb.njit(fastmath=True, cache=True)
def gemv_int8_serial(x, q, scale, y):
    """gemv_int8 on the calling thread."""
    _rows(x, q, scale, y, 0, q.shape[0])
