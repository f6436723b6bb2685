"""int8 weight-only quantization, per output channel, and its CPU kernels.

A weight w [N, K] (bf16/fp16/fp32) is stored as q [N, K] int8 and scale [N] fp32 with
w[n] ~ q[n] * scale[n], scale[n] = max_k |w[n, k]| / 127, q = round(w / scale) (ties to
even, as torch.round). Activations stay fp32; a product is exact fp32 arithmetic on the
dequantized weights: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k].

Decode (M <= the decode threshold) reads the int8 bytes once (half of bf16's):
- with AVX512-VNNI, K a multiple of 64 and M <= 4 (`gemv_int8_vnni`, `cpu_vnni`), as llama.cpp's
  Q8_0 x Q8_0: each row of x is rounded to int8 per group of 32, and 64 weights at a
  time go through one `vpdpbusd` (the weights offset to unsigned, q + 128, whose extra
  128 * sum(xq) per group is subtracted), scaled by dx per group and scale[n] per row.
  Error: the activations' int8 rounding (relative ~1/254 per group);
- otherwise widening them in registers (`_dot_i8`: LLVM vectorizes the int8 -> fp32
  conversion and the FMA), exact fp32 arithmetic on the dequantized weights.
Prefill dequantizes the matrix to fp32 a block of rows at a time (~1 MiB, so the block
is still in cache when MKL's sgemm reads it) and multiplies each block.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from c2c_kernels.cpu_gemv import _panel
from c2c_kernels.cpu_vnni import (
    GROUP,
    HAS_VNNI,
    V16F,
    V16I32,
    V64I8,
    are_c_arrays,
    dpbusd,
    quantize_activations,
    shape_of,
    vector_at,
)

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


VNNI_BLOCK = 64  # weights per vpdpbusd: two groups of 32
_LANES = 8  # vpdpbusd lanes per group of 32


VNNI_MAX_ROWS = 4  # larger batches: the fp32 kernel's 4x4 register blocks do less work per weight


def uses_vnni(m: int, k: int) -> bool:
    """Whether a decode of M rows over K columns takes the VNNI kernel (measured on the
    2-core Xeon: at M <= 4 VNNI is as fast or faster, at M = 8 the fp32 kernel wins)."""
    return HAS_VNNI and k % VNNI_BLOCK == 0 and m <= VNNI_MAX_ROWS


@intrinsic
def _block64(typingctx, qrow, xq, dx8, offset8, i, acc):
    """acc[m, 0:16] += dx8[m, 16i:16i+16] * vpdpbusd(qrow[64i:64i+64] + 128, xq[m, 64i:64i+64])
    - offset8[m, 16i:16i+16] for every row m of x (the weights loaded once)."""
    if not are_c_arrays((qrow, types.int8, 1), (xq, types.int8, 2), (dx8, types.float32, 2),
                        (offset8, types.float32, 2), (acc, types.float32, 2)):
        return None

    def codegen(context, builder, signature, args):
        q_a, x_a, dx_a, off_a, i_v, acc_a = args
        at, intp = signature.args, i_v.type
        byte0 = builder.mul(i_v, ir.Constant(intp, VNNI_BLOCK))
        weights = builder.load(vector_at(context, builder, at[0], q_a, byte0, V64I8), align=1)
        unsigned = builder.xor(weights, ir.Constant(V64I8, [0x80] * 64))  # q + 128 as an unsigned byte
        x_rows, x_width = shape_of(context, builder, at[1], x_a)
        dx_width = shape_of(context, builder, at[2], dx_a)[1]
        with cgutils.for_range(builder, x_rows) as loop:
            m = loop.index
            xv = builder.load(vector_at(context, builder, at[1], x_a, builder.add(builder.mul(m, x_width), byte0),
                                        V64I8), align=1)
            isum = dpbusd(builder, ir.Constant(V16I32, [0] * 16), unsigned, xv)
            lane0 = builder.add(builder.mul(m, dx_width), builder.mul(i_v, ir.Constant(intp, 16)))
            dx = builder.load(vector_at(context, builder, at[2], dx_a, lane0, V16F), align=4)
            off = builder.load(vector_at(context, builder, at[3], off_a, lane0, V16F), align=4)
            acc_at = vector_at(context, builder, at[5], acc_a, builder.mul(m, ir.Constant(intp, 16)), V16F)
            scaled = builder.fsub(builder.fmul(dx, builder.sitofp(isum, V16F)), off)
            builder.store(builder.fadd(builder.load(acc_at, align=4), scaled), acc_at, align=4)
        return context.get_dummy_value()

    return types.void(qrow, xq, dx8, offset8, i, acc), codegen


@nb.njit(fastmath=True, inline="always")
def _rows_vnni(xq, dx8, offset8, q, scale, y, n0, n1):
    acc = np.empty((xq.shape[0], 16), dtype=np.float32)  # [M, 16]
    for n in range(n0, n1):
        acc[:] = 0.0
        for i in range(q.shape[1] // VNNI_BLOCK):
            _block64(q[n], xq, dx8, offset8, i, acc)
        for m in range(xq.shape[0]):
            y[m, n] = acc[m].sum() * scale[n]


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_int8_vnni(xq, dx8, offset8, q, scale, y, num_tasks):
    """y [M, N] = int8 x (`vnni_activations`) @ dequant(q [N, K] int8, scale [N] f32).T, rows in parallel."""
    n_rows = q.shape[0]
    per_task = (n_rows + num_tasks - 1) // num_tasks
    for t in nb.prange(num_tasks):
        _rows_vnni(xq, dx8, offset8, q, scale, y, t * per_task, min(n_rows, (t + 1) * per_task))


@nb.njit(fastmath=True, cache=True)
def gemv_int8_vnni_serial(xq, dx8, offset8, q, scale, y):
    """gemv_int8_vnni on the calling thread."""
    _rows_vnni(xq, dx8, offset8, q, scale, y, 0, q.shape[0])


def vnni_activations(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(xq [M, K] int8, dx8, offset8 [M, K/4]) of x [M, K] f32 for the VNNI kernels."""
    m, k = x.shape
    xq = np.empty((m, k), np.int8)
    dx8, offset8 = np.empty((m, k // GROUP * _LANES), np.float32), np.empty((m, k // GROUP * _LANES), np.float32)
    quantize_activations(x, xq, xq, dx8, offset8, False, np.float32(128.0 / _LANES))
    return xq, dx8, offset8


def prefill_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] fp32 @ dequant(q, scale).T, dequantizing ~1 MiB of rows at a time."""
    q_np, scale_np = q.numpy(), scale.numpy()
    return prefill_by_blocks(x, q.shape[0], q.shape[1], lambda n0, out: dequantize_rows_int8(q_np, scale_np, n0, out))


@nb.njit(parallel=True, fastmath=True, cache=True)
def dequantize_rows_int8(q, scale, n0, out):
    """out [R, K] f32 = q[n0:n0+R] * scale[n0:n0+R] (one pass, rows in parallel)."""
    for r in nb.prange(out.shape[0]):
        s = scale[n0 + r]
        for k in range(out.shape[1]):
            out[r, k] = np.float32(q[n0 + r, k]) * s


def prefill_by_blocks(x: torch.Tensor, n: int, k: int, dequantize_into) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ W.T where dequantize_into(n0, out) writes W[n0:n0+R] into
    out [R, K] fp32 (a numpy view of one reused buffer); ~1 MiB of rows at a time, so a
    block is still in cache when sgemm reads it."""
    from c2c_kernels.cpu_gemv import PARALLEL_LOCK

    y = torch.empty(x.shape[0], n, dtype=torch.float32)  # [M, N]
    rows = min(n, max(16, (1 << 18) // max(1, k)))
    block = torch.empty(rows, k, dtype=torch.float32)  # [rows, K]
    for n0 in range(0, n, rows):
        part = block[:min(rows, n - n0)]
        with PARALLEL_LOCK:
            dequantize_into(n0, part.numpy())
        torch.mm(x, part.T, out=y[:, n0:n0 + part.shape[0]])
    return y
