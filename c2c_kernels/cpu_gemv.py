"""CPU output-stationary GEMV / skinny GEMM over bf16 or fp16 weights (the decode path).

y[M, N] = x[M, K] @ w[N, K].T with M small (decode: one token per running sequence).
The cost is streaming the weights, so every weight element is loaded from memory once
and applied to all M rows of x while it is in a register. Threads split the output
rows (prange, static chunks). The inner loop over K is a widen-and-FMA that LLVM
vectorizes (fastmath lets it reorder the fp32 sums into vector lanes):

- M == 1: contiguous row ranges per thread, one row at a time, four vector
  accumulators (memory-bound).
- M > 1: a 4x4 register block (4 weight rows x 4 rows of x, 16 accumulators): per
  K-vector 4 weight loads + 4 x loads feed 16 FMAs, so the loop is FMA-bound rather than
  load-bound. The last 1-3 rows of x take a 2x4 / 1x4 block (no zero padding).

bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits, so the widen
is `zext(w) << 16` reinterpreted as float32 (an LLVM bitcast, `_widen`); fp16 is an
`fpext`. Weights arrive as zero-copy numpy views of the host store: uint16 (bf16 bits) or
int16 (fp16 bits).
"""

from __future__ import annotations

import os
import threading

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# Numba's "omp" layer brings a second OpenMP runtime next to torch's; with spinning idle
# threads (OpenMP's default) they fight, and on a small CPU slice that made a decode step
# ~5x slower (140-220 ms vs 25-35 ms for a 0.5B-like mix of linear and torch ops). Every
# c2cserve process sets OMP_WAIT_POLICY=PASSIVE (services/cli.py); then "omp" is the
# fastest layer (0.5B decode step: 95 ms vs 118 ms with "workqueue", quiet 2-core
# machine). Without passive waiting, "workqueue" (which sleeps) is the safe choice. The
# workqueue layer must not be entered from two threads at once: every parallel kernel
# call holds PARALLEL_LOCK. NUMBA_THREADING_LAYER overrides the choice.
if "NUMBA_THREADING_LAYER" not in os.environ:
    is_passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    nb.config.THREADING_LAYER = "omp" if is_passive else "workqueue"
PARALLEL_LOCK = threading.Lock()


@intrinsic
def _widen(typingctx, v):
    """16-bit weight bits -> float32, exactly: uint16 holds bf16 bits, int16 fp16 bits.

    (Numba has no float16 arrays on the CPU, so fp16 weights travel as int16 views.)
    """
    if v == types.uint16:

        def codegen_bf16(context, builder, signature, args):
            i32 = ir.IntType(32)
            wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(v), codegen_bf16
    if v == types.int16:

        def codegen_f16(context, builder, signature, args):
            half = builder.bitcast(args[0], ir.HalfType())
            return builder.fpext(half, ir.FloatType())

        return types.float32(v), codegen_f16
    return None


@nb.njit(fastmath=True, inline="always")
def _dot1(w0, x):
    a0 = np.float32(0.0)
    for k in range(x.shape[0]):
        a0 += _widen(w0[k]) * x[k]
    return a0


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_m1(x, w, y, num_tasks):
    """y[0] = w @ x[0]; x [1, K] f32, w [N, K] uint16 bf16 / int16 fp16 bits, y [1, N] f32.

    `num_tasks` contiguous row ranges in parallel, one row at a time: each task streams
    one run of memory (the prefetchers follow it), and `_dot1` keeps four vector
    accumulators in flight. (Interleaving two rows per step, as a first version did,
    left LLVM one accumulator per row: FMA-latency bound at ~12 GB/s on K=896.)
    """
    n_rows = w.shape[0]
    per_task = (n_rows + num_tasks - 1) // num_tasks
    xr = x[0]
    for t in nb.prange(num_tasks):
        for n in range(t * per_task, min(n_rows, (t + 1) * per_task)):
            y[0, n] = _dot1(w[n], xr)


@nb.njit(fastmath=True, cache=True)
def gemv_m1_serial(x, w, y):
    """gemv_m1 on the calling thread: small matrices, where waking threads costs more."""
    xr = x[0]
    for n in range(w.shape[0]):
        y[0, n] = _dot1(w[n], xr)


@nb.njit(parallel=True, fastmath=True, cache=True)
def grouped_gemv_m1(xs, ws, ys, tasks_per_group):
    """ys[g] = ws[g] @ xs[g] for every g, all in one parallel region.

    xs [G, K] f32; ws a G-tuple of [N, K] 16-bit matrices (same N); ys [G, N] f32. For
    MoE decode: the selected experts' matrices of one token, whose separate calls would
    each pay a thread wake-up and leave a core idle on the small ones.
    """
    for task in nb.prange(len(ws) * tasks_per_group):
        g, t = task // tasks_per_group, task % tasks_per_group
        w, xr = ws[g], xs[g]
        per_task = (w.shape[0] + tasks_per_group - 1) // tasks_per_group
        for n in range(t * per_task, min(w.shape[0], (t + 1) * per_task)):
            ys[g, n] = _dot1(w[n], xr)


@nb.njit(fastmath=True, inline="always")
def _block4x4(x, m0, w, n0, y, k0, k1, accumulate):
    """y[m0:m0+4, n0:n0+4] (+)= x[m0:m0+4, k0:k1] @ widen(w[n0:n0+4, k0:k1]).T.

    16 register accumulators; `accumulate` adds to y instead of overwriting it.
    """
    z = np.float32(0.0)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    x0, x1, x2, x3 = x[m0, k0:k1], x[m0 + 1, k0:k1], x[m0 + 2, k0:k1], x[m0 + 3, k0:k1]
    w0, w1, w2, w3 = w[n0, k0:k1], w[n0 + 1, k0:k1], w[n0 + 2, k0:k1], w[n0 + 3, k0:k1]
    if accumulate:
        a00, a01, a02, a03 = y[m0, n0], y[m0, n0 + 1], y[m0, n0 + 2], y[m0, n0 + 3]
        a10, a11, a12, a13 = y[m0 + 1, n0], y[m0 + 1, n0 + 1], y[m0 + 1, n0 + 2], y[m0 + 1, n0 + 3]
        a20, a21, a22, a23 = y[m0 + 2, n0], y[m0 + 2, n0 + 1], y[m0 + 2, n0 + 2], y[m0 + 2, n0 + 3]
        a30, a31, a32, a33 = y[m0 + 3, n0], y[m0 + 3, n0 + 1], y[m0 + 3, n0 + 2], y[m0 + 3, n0 + 3]
    for k in range(k1 - k0):
        c0, c1, c2, c3 = x0[k], x1[k], x2[k], x3[k]
        r = _widen(w0[k])
        a00 += r * c0
        a10 += r * c1
        a20 += r * c2
        a30 += r * c3
        r = _widen(w1[k])
        a01 += r * c0
        a11 += r * c1
        a21 += r * c2
        a31 += r * c3
        r = _widen(w2[k])
        a02 += r * c0
        a12 += r * c1
        a22 += r * c2
        a32 += r * c3
        r = _widen(w3[k])
        a03 += r * c0
        a13 += r * c1
        a23 += r * c2
        a33 += r * c3
    y[m0, n0], y[m0, n0 + 1], y[m0, n0 + 2], y[m0, n0 + 3] = a00, a01, a02, a03
    y[m0 + 1, n0], y[m0 + 1, n0 + 1], y[m0 + 1, n0 + 2], y[m0 + 1, n0 + 3] = a10, a11, a12, a13
    y[m0 + 2, n0], y[m0 + 2, n0 + 1], y[m0 + 2, n0 + 2], y[m0 + 2, n0 + 3] = a20, a21, a22, a23
    y[m0 + 3, n0], y[m0 + 3, n0 + 1], y[m0 + 3, n0 + 2], y[m0 + 3, n0 + 3] = a30, a31, a32, a33


@nb.njit(fastmath=True, inline="always")
def _block4x1(x, m0, w, n, y, k0, k1, accumulate):
    """y[m0:m0+4, n] (+)= x[m0:m0+4, k0:k1] @ widen(w[n, k0:k1]): a leftover weight row."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    if accumulate:
        a0, a1, a2, a3 = y[m0, n], y[m0 + 1, n], y[m0 + 2, n], y[m0 + 3, n]
    x0, x1, x2, x3 = x[m0, k0:k1], x[m0 + 1, k0:k1], x[m0 + 2, k0:k1], x[m0 + 3, k0:k1]
    wr = w[n, k0:k1]
    for k in range(k1 - k0):
        r = _widen(wr[k])
        a0 += r * x0[k]
        a1 += r * x1[k]
        a2 += r * x2[k]
        a3 += r * x3[k]
    y[m0, n], y[m0 + 1, n], y[m0 + 2, n], y[m0 + 3, n] = a0, a1, a2, a3


@nb.njit(fastmath=True, inline="always")
def _block2x4(x, m0, w, n0, y, k0, k1, accumulate):
    """y[m0:m0+2, n0:n0+4] (+)= ...: a batch's last 2 rows, without padding them to 4."""
    z = np.float32(0.0)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    if accumulate:
        a00, a01, a02, a03 = y[m0, n0], y[m0, n0 + 1], y[m0, n0 + 2], y[m0, n0 + 3]
        a10, a11, a12, a13 = y[m0 + 1, n0], y[m0 + 1, n0 + 1], y[m0 + 1, n0 + 2], y[m0 + 1, n0 + 3]
    x0, x1 = x[m0, k0:k1], x[m0 + 1, k0:k1]
    w0, w1, w2, w3 = w[n0, k0:k1], w[n0 + 1, k0:k1], w[n0 + 2, k0:k1], w[n0 + 3, k0:k1]
    for k in range(k1 - k0):
        c0, c1 = x0[k], x1[k]
        r0, r1, r2, r3 = _widen(w0[k]), _widen(w1[k]), _widen(w2[k]), _widen(w3[k])
        a00 += r0 * c0
        a01 += r1 * c0
        a02 += r2 * c0
        a03 += r3 * c0
        a10 += r0 * c1
        a11 += r1 * c1
        a12 += r2 * c1
        a13 += r3 * c1
    y[m0, n0], y[m0, n0 + 1], y[m0, n0 + 2], y[m0, n0 + 3] = a00, a01, a02, a03
    y[m0 + 1, n0], y[m0 + 1, n0 + 1], y[m0 + 1, n0 + 2], y[m0 + 1, n0 + 3] = a10, a11, a12, a13


@nb.njit(fastmath=True, inline="always")
def _block1x4(x, m, w, n0, y, k0, k1, accumulate):
    """y[m, n0:n0+4] (+)= ...: a batch's last row."""
    z = np.float32(0.0)
    a0 = a1 = a2 = a3 = z
    if accumulate:
        a0, a1, a2, a3 = y[m, n0], y[m, n0 + 1], y[m, n0 + 2], y[m, n0 + 3]
    xr = x[m, k0:k1]
    w0, w1, w2, w3 = w[n0, k0:k1], w[n0 + 1, k0:k1], w[n0 + 2, k0:k1], w[n0 + 3, k0:k1]
    for k in range(k1 - k0):
        c = xr[k]
        a0 += _widen(w0[k]) * c
        a1 += _widen(w1[k]) * c
        a2 += _widen(w2[k]) * c
        a3 += _widen(w3[k]) * c
    y[m, n0], y[m, n0 + 1], y[m, n0 + 2], y[m, n0 + 3] = a0, a1, a2, a3


@nb.njit(fastmath=True, inline="always")
def _rows_tail(x, m4, m1, w, n, y, k0, k1, accumulate):
    """y[m4:m1, n] (+)= ... for the < 4 rows past the last 4-row group, one weight row."""
    for m in range(m4, m1):
        a = y[m, n] if accumulate else np.float32(0.0)
        xr, wr = x[m, k0:k1], w[n, k0:k1]
        for k in range(k1 - k0):
            a += _widen(wr[k]) * xr[k]
        y[m, n] = a


@nb.njit(fastmath=True, inline="always")
def _panel(x, w, y, m0, m1, n0, n1, k0, k1, accumulate):
    """y[m0:m1, n0:n1] (+)= x[m0:m1, k0:k1] @ widen(w[n0:n1, k0:k1]).T; m0 % 4 == 0.

    4-row groups of x take the 4x4 block; the last 1-3 rows take a 2x4 and/or 1x4 block
    instead of being padded to 4 (a batch of 2 then does half the FMAs).
    """
    n4 = n0 + (n1 - n0) // 4 * 4
    m4 = m0 + (m1 - m0) // 4 * 4
    tail = m1 - m4
    for n in range(n0, n4, 4):
        for m in range(m0, m4, 4):
            _block4x4(x, m, w, n, y, k0, k1, accumulate)
        if tail >= 2:
            _block2x4(x, m4, w, n, y, k0, k1, accumulate)
        if tail % 2 == 1:
            _block1x4(x, m1 - 1, w, n, y, k0, k1, accumulate)
    for n in range(n4, n1):
        for m in range(m0, m4, 4):
            _block4x1(x, m, w, n, y, k0, k1, accumulate)
        _rows_tail(x, m4, m1, w, n, y, k0, k1, accumulate)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_skinny(x, w, y, num_tasks):
    """y = x @ widen(w).T; x [M, K] f32 (any M), w [N, K] 16-bit, y [M, N] f32.

    Output-stationary: `num_tasks` contiguous row ranges (multiples of 4 rows) in
    parallel; each weight quad is read once from memory and re-read from L1 for each
    4-row group of x.
    """
    n_rows, k_dim = w.shape
    per_task = ((n_rows + num_tasks - 1) // num_tasks + 3) // 4 * 4
    for t in nb.prange(num_tasks):
        n0 = min(n_rows, t * per_task)
        _panel(x, w, y, 0, x.shape[0], n0, min(n_rows, n0 + per_task), 0, k_dim, False)


@nb.njit(fastmath=True, cache=True)
def gemm_skinny_serial(x, w, y):
    """gemm_skinny on the calling thread (small matrices)."""
    _panel(x, w, y, 0, x.shape[0], 0, w.shape[0], 0, w.shape[1], False)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_ws(x, w, y, num_tasks, n_block, k_block, m_block):
    """Weight-stationary tiled GEMM for large M (prefill); shapes as gemm_skinny.

    Each task owns a contiguous range of output rows, walked in panels of
    [n_block, k_block] weights: a panel is read from memory once (it stays in L2) and
    applied to every m_block rows of x (an x block [m_block, k_block] stays in L1).
    m_block % 4 == 0.
    """
    n_rows, k_dim = w.shape
    m_rows = x.shape[0]
    per_task = ((n_rows + num_tasks - 1) // num_tasks + 3) // 4 * 4
    for t in nb.prange(num_tasks):
        t0 = min(n_rows, t * per_task)
        t1 = min(n_rows, t0 + per_task)
        for n0 in range(t0, t1, n_block):
            n1 = min(t1, n0 + n_block)
            for k0 in range(0, k_dim, k_block):
                k1 = min(k_dim, k0 + k_block)
                for m0 in range(0, m_rows, m_block):
                    m1 = min(m_rows, m0 + m_block)
                    _panel(x, w, y, m0, m1, n0, n1, k0, k1, k0 > 0)
