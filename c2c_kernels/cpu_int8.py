"""int8 weight-only quantization, per output channel, and its CPU kernels.

A weight w [N, K] (bf16/fp16/fp32) is stored as q [N, K] int8 and scale [N] fp32 with
w[n] ~ q[n] * scale[n], scale[n] = max_k |w[n, k]| / 127, q = round(w / scale) (ties to
even, as torch.round). Activations stay fp32; a product is exact fp32 arithmetic on the
dequantized weights: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k].

Decode (M <= the decode threshold) reads the int8 bytes once (half of bf16's), widening
them in registers (`_dot_i8`: LLVM vectorizes the int8 -> fp32 conversion and the FMA);
prefill dequantizes the matrix to fp32 a block of rows at a time (~1 MiB, so the block
is still in cache when MKL's sgemm reads it) and multiplies each block.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from c2c_kernels.cpu_gemv import _panel

QMAX = 127
ROW_BLOCK = 64  # rows converted to bf16 at a time for a batch (64 x K x 2 bytes: in L1/L2)


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
    """y[:, n0:n1] = x @ (q[n0:n1] * scale).T; a weight row is read once for all M rows of x.

    M == 1 widens inside the dot. M > 1 converts ROW_BLOCK rows at a time into bf16 bits
    (exact: |q| <= 127 fits bf16's 8-bit significand) and runs the bf16 skinny kernel's
    4x4 register blocks (`cpu_gemv._panel`) over them, then scales the outputs.
    """
    if x.shape[0] == 1:
        xr = x[0]
        for n in range(n0, n1):
            y[0, n] = _dot_i8(q[n], xr) * scale[n]
        return
    k_dim, m_rows = q.shape[1], x.shape[0]
    wide = np.empty(k_dim, dtype=np.float32)
    bits = wide.view(np.uint32)
    w16 = np.empty((ROW_BLOCK, k_dim), dtype=np.uint16)
    y_block = np.empty((m_rows, ROW_BLOCK), dtype=np.float32)
    for b0 in range(n0, n1, ROW_BLOCK):
        num = min(n1, b0 + ROW_BLOCK) - b0
        for r in range(num):
            src, dst = q[b0 + r], w16[r]
            for k in range(k_dim):
                wide[k] = np.float32(src[k])
            for k in range(k_dim):
                dst[k] = np.uint16(bits[k] >> 16)
        _panel(x, w16, y_block, 0, m_rows, 0, num, 0, k_dim, False)
        for m in range(m_rows):
            for r in range(num):
                y[m, b0 + r] = y_block[m, r] * scale[b0 + r]


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


def prefill_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] fp32 @ dequant(q, scale).T, dequantizing ~1 MiB of rows at a time."""
    return prefill_by_blocks(x, q.shape[0], q.shape[1], lambda n0, n1: dequantize_int8(q[n0:n1], scale[n0:n1]))


def prefill_by_blocks(x: torch.Tensor, n: int, k: int, dequantize_rows) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ W.T where dequantize_rows(n0, n1) gives W[n0:n1] [rows, K] fp32;
    ~1 MiB of rows at a time, so a block is still in cache when sgemm reads it."""
    y = torch.empty(x.shape[0], n, dtype=torch.float32)  # [M, N]
    rows = max(16, (1 << 18) // max(1, k))
    for n0 in range(0, n, rows):
        torch.mm(x, dequantize_rows(n0, min(n, n0 + rows)).T, out=y[:, n0:n0 + rows])
    return y
