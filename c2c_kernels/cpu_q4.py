"""4-bit group-wise weights ("q4": llama.cpp's Q4_0 numbers in two arrays) and their CPU kernels.

A weight w [N, K] (K a multiple of 32) is cut into groups of 32 along K. Per group,
d = m / -8 where m is the group's value of largest magnitude (sign kept), and
q = min(15, trunc(w / d + 8.5)), so w ~ d * (q - 8): symmetric, 16 levels, no minimum
(Q4_1's min would cost another 2 bytes per group; Q4_0 keeps the bytes at 0.5625 per
weight, 3.56x fewer than bf16). The numbers are exactly what `gguf.quants.quantize(...,
Q4_0)` computes, so a GGUF Q4_0 tensor is served as is (`worker.gguf_tensors`):

- qs [N, K/2] uint8: byte 16g + j holds element 32g + j in its low nibble and element
  32g + 16 + j in its high nibble (GGUF's order inside a block);
- scale [N, K/32] fp16: d per group (GGUF keeps it beside the nibbles, 18-byte blocks;
  here apart, so rows stay aligned and fused q|k|v rows stay contiguous).

Decode (M <= the decode threshold) reads the packed bytes once:
- with AVX512-VNNI and K a multiple of 128 (`gemv_q4_vnni`), as llama.cpp's Q4_0 x Q8_0
  dot product: each row of x is rounded to int8 per group of 32 (scale max|x| / 127,
  round half to even), and 128 weights at a time go through two `vpdpbusd` (unsigned
  nibbles x signed int8, exact int32 sums), then fp32 scaling by d * dx; the -8 offset
  is subtracted per group as d * 8 * dx * sum(xq). The nibbles of a block are unpacked
  once for all rows of a batch. Error: the activations' int8 rounding (relative ~1/254
  per group), as in llama.cpp.
- otherwise (`gemv_q4`) fp32 on the dequantized weights, exact up to fp32 rounding.
Prefill dequantizes ~1 MiB of rows at a time into sgemm (`cpu_int8.prefill_by_blocks`):
fp32 activations, exact up to fp32 rounding.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from c2c_kernels.cpu_gemv import _widen
from c2c_kernels.cpu_int8 import prefill_by_blocks
from c2c_kernels.cpu_vnni import (
    F32,
    HAS_VNNI,
    I8,
    I16,
    I32,
    V16F,
    V16I32,
    V64I8,
    are_c_arrays,
    dpbusd,
    quantize_activations,
    shape_of,
    vector_at,
)

GROUP = 32
HALF = GROUP // 2


def can_quantize_q4(shape) -> bool:
    """q4 takes [N, K] matrices with K a multiple of the group size."""
    return len(shape) == 2 and shape[1] % GROUP == 0 and shape[1] > 0


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (qs [N, K/2] uint8, scale [N, K/32] fp16); bit for bit gguf's Q4_0."""
    n, k = w.shape
    if not can_quantize_q4(w.shape):
        raise ValueError(f"q4 needs K a multiple of {GROUP}, got shape {tuple(w.shape)}")
    blocks = w.detach().to(torch.float32).reshape(n, k // GROUP, GROUP)  # [N, G, 32]
    at = blocks.abs().argmax(dim=-1, keepdim=True)
    d = blocks.gather(-1, at) / -8  # [N, G, 1]
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp_(0, 15).to(torch.uint8)  # [N, G, 32]
    qs = q[..., :HALF] | (q[..., HALF:] << 4)  # [N, G, 16]
    return qs.reshape(n, k // 2).contiguous(), d.reshape(n, k // GROUP).to(torch.float16)


def dequantize_q4(qs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] fp32 = d * (q - 8) (the float reference the kernels compute with)."""
    n, groups = scale.shape
    packed = qs.reshape(n, groups, HALF)
    q = torch.cat((packed & 15, packed >> 4), dim=-1).to(torch.float32) - 8  # [N, G, 32]
    return (q * scale.to(torch.float32)[..., None]).reshape(n, groups * GROUP)


VNNI_BLOCK = 4 * GROUP  # weights per vpdpbusd pair: 64 bytes of nibbles


def can_use_vnni(k: int) -> bool:
    return HAS_VNNI and k % VNNI_BLOCK == 0


def _nibble(shift: int):
    """u8 byte -> float32 of (its low or high nibble) - 8, in 8-bit arithmetic (Numba would
    widen `b & 15` to int64, and LLVM then converts 8 lanes a vector instead of 16)."""

    @intrinsic
    def nibble(typingctx, b):
        if b != types.uint8:
            return None

        def codegen(context, builder, signature, args):
            v = args[0]
            v = builder.lshr(v, ir.Constant(I8, 4)) if shift else builder.and_(v, ir.Constant(I8, 15))
            return builder.sitofp(builder.sub(v, ir.Constant(I8, 8)), F32)

        return types.float32(b), codegen

    return nibble


_lo, _hi = _nibble(0), _nibble(4)


@nb.njit(fastmath=True, inline="always")
def _dequant_row(qrow, srow, out):
    """out [K] f32 = d * (q - 8) of one packed row."""
    for g in range(srow.shape[0]):
        d = _widen(srow[g])
        for j in range(HALF):
            b = qrow[g * HALF + j]
            out[g * GROUP + j] = d * _lo(b)
            out[g * GROUP + HALF + j] = d * _hi(b)


@nb.njit(fastmath=True, inline="always")
def _rows(x, qs, scale, y, n0, n1):
    """y[:, n0:n1] = x @ dequant(qs, scale)[n0:n1].T in fp32; each packed row is read once.

    acc holds one partial sum per byte position of a group (16 lanes: one vector).
    """
    acc = np.empty(HALF, dtype=np.float32)
    for n in range(n0, n1):
        qrow, srow = qs[n], scale[n]
        for m in range(x.shape[0]):
            xr = x[m]
            acc[:] = 0.0
            for g in range(srow.shape[0]):
                d = _widen(srow[g])
                for j in range(HALF):
                    b = qrow[g * HALF + j]
                    acc[j] += d * (xr[g * GROUP + j] * _lo(b) + xr[g * GROUP + HALF + j] * _hi(b))
            y[m, n] = acc.sum()


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_q4(x, qs, scale, y, num_tasks):
    """y [M, N] = x [M, K] f32 @ dequant(qs [N, K/2] u8, scale [N, K/32] i16 fp16 bits).T, rows in parallel."""
    n_rows = qs.shape[0]
    per_task = (n_rows + num_tasks - 1) // num_tasks
    for t in nb.prange(num_tasks):
        _rows(x, qs, scale, y, t * per_task, min(n_rows, (t + 1) * per_task))


@nb.njit(fastmath=True, cache=True)
def gemv_q4_serial(x, qs, scale, y):
    """gemv_q4 on the calling thread."""
    _rows(x, qs, scale, y, 0, qs.shape[0])


# ---- AVX512-VNNI path (c2c_kernels.cpu_vnni) --------------------------------------

@intrinsic
def _block128(typingctx, qrow, xlo, xhi, srow, dx4, offset4, i, acc):
    """acc[m, 0:16] += the 128 weights qrow[64i:64i+64] (4 groups) . (xlo[m], xhi[m]) int8,
    scaled, for every row m of x: the nibbles are unpacked and the scales widened once.

    Lane L of a vpdpbusd sums bytes 4L..4L+3, so lanes 4g'..4g'+3 hold group 4i + g':
    they add d[4i + g'] (fp16, widened) * (dx4[m, 16i + L] * sum - offset4[m, 16i + L]),
    dx4 the group's activation scale and offset4 a quarter of its -8 term (4 lanes each).
    """
    if not are_c_arrays((qrow, types.uint8, 1), (xlo, types.int8, 2), (xhi, types.int8, 2), (srow, types.int16, 1),
                        (dx4, types.float32, 2), (offset4, types.float32, 2), (acc, types.float32, 2)):
        return None

    def codegen(context, builder, signature, args):
        q_a, xlo_a, xhi_a, s_a, dx_a, off_a, i_v, acc_a = args
        at = signature.args
        intp = i_v.type
        byte0 = builder.mul(i_v, ir.Constant(intp, 64))
        packed = builder.load(vector_at(context, builder, at[0], q_a, byte0, V64I8), align=1)
        lo = builder.and_(packed, ir.Constant(V64I8, [15] * 64))
        hi = builder.lshr(packed, ir.Constant(V64I8, [4] * 64))
        d4_at = vector_at(context, builder, at[3], s_a, builder.mul(i_v, ir.Constant(intp, 4)), ir.VectorType(I16, 4))
        d4 = builder.fpext(builder.bitcast(builder.load(d4_at, align=2), ir.VectorType(ir.HalfType(), 4)),
                           ir.VectorType(F32, 4))
        d16 = builder.shuffle_vector(d4, d4, ir.Constant(ir.VectorType(I32, 16), [k // 4 for k in range(16)]))
        x_rows, x_width = shape_of(context, builder, at[1], xlo_a)
        dx_width = shape_of(context, builder, at[4], dx_a)[1]
        with cgutils.for_range(builder, x_rows) as loop:
            m = loop.index
            x0 = builder.add(builder.mul(m, x_width), byte0)
            x_lo = builder.load(vector_at(context, builder, at[1], xlo_a, x0, V64I8), align=1)
            x_hi = builder.load(vector_at(context, builder, at[2], xhi_a, x0, V64I8), align=1)
            isum = dpbusd(builder, dpbusd(builder, ir.Constant(V16I32, [0] * 16), lo, x_lo), hi, x_hi)
            dx0 = builder.add(builder.mul(m, dx_width), builder.mul(i_v, ir.Constant(intp, 16)))
            dx = builder.load(vector_at(context, builder, at[4], dx_a, dx0, V16F), align=4)
            off = builder.load(vector_at(context, builder, at[5], off_a, dx0, V16F), align=4)
            acc_at = vector_at(context, builder, at[7], acc_a, builder.mul(m, ir.Constant(intp, HALF)), V16F)
            scaled = builder.fmul(d16, builder.fsub(builder.fmul(dx, builder.sitofp(isum, V16F)), off))
            builder.store(builder.fadd(builder.load(acc_at, align=4), scaled), acc_at, align=4)
        return context.get_dummy_value()

    return types.void(qrow, xlo, xhi, srow, dx4, offset4, i, acc), codegen


@nb.njit(fastmath=True, inline="always")
def _rows_vnni(xlo, xhi, dx4, offset4, qs, scale, y, n0, n1):
    acc = np.empty((xlo.shape[0], HALF), dtype=np.float32)  # [M, 16]
    num_blocks = scale.shape[1] // 4
    for n in range(n0, n1):
        qrow, srow = qs[n], scale[n]
        acc[:] = 0.0
        for i in range(num_blocks):
            _block128(qrow, xlo, xhi, srow, dx4, offset4, i, acc)
        for m in range(xlo.shape[0]):
            y[m, n] = acc[m].sum()


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_q4_vnni(xlo, xhi, dx4, offset4, qs, scale, y, num_tasks):
    """y [M, N] = quantized x (`quantize_activations`) @ dequant(qs, scale).T, rows in parallel."""
    n_rows = qs.shape[0]
    per_task = (n_rows + num_tasks - 1) // num_tasks
    for t in nb.prange(num_tasks):
        _rows_vnni(xlo, xhi, dx4, offset4, qs, scale, y, t * per_task, min(n_rows, (t + 1) * per_task))


@nb.njit(fastmath=True, cache=True)
def gemv_q4_vnni_serial(xlo, xhi, dx4, offset4, qs, scale, y):
    """gemv_q4_vnni on the calling thread."""
    _rows_vnni(xlo, xhi, dx4, offset4, qs, scale, y, 0, qs.shape[0])


def vnni_activations(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(xlo, xhi, dx4, offset4) of x [M, K] f32 for the VNNI kernels."""
    m, k = x.shape
    parts = (np.empty((m, k // 2), np.int8), np.empty((m, k // 2), np.int8),
             np.empty((m, k // 8), np.float32), np.empty((m, k // 8), np.float32))
    quantize_activations(x, parts[0], parts[1], parts[2], parts[3], True, np.float32(2.0))  # 8 / 4 lanes
    return parts


def prefill_q4(x: torch.Tensor, qs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] fp32 @ dequant(qs, scale).T, ~1 MiB of dequantized rows at a time."""
    qs_np, scale_np = qs.numpy(), scale.view(torch.int16).numpy()
    return prefill_by_blocks(x, qs.shape[0], 2 * qs.shape[1],
                             lambda n0, out: dequantize_rows_q4(qs_np, scale_np, n0, out))


@nb.njit(parallel=True, fastmath=True, cache=True)
def dequantize_rows_q4(qs, scale, n0, out):
    """out [R, K] f32 = dequant(qs, scale)[n0:n0+R] (scale: fp16 bits as int16; rows in parallel)."""
    for r in nb.prange(out.shape[0]):
        _dequant_row(qs[n0 + r], scale[n0 + r], out[r])
