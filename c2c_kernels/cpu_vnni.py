"""AVX512-VNNI building blocks shared by the quantized decode kernels (`cpu_q4`, `cpu_int8`).

`vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 consecutive
products into one of 16 int32 lanes: exact integer dot products, 64 weights a
instruction. Numba has no vector types, so the kernels emit it from `@intrinsic`s as the
LLVM intrinsic `llvm.x86.avx512.vpdpbusd.512`; they are compiled only where the CPU has
AVX512-VNNI and AVX512-BW (`HAS_VNNI`; a CPU without them keeps the fp32 kernels).

The activations side, shared by both formats: each row of x is rounded to int8 per group
of 32 (scale dx = max|x| / 127, round half to even), as llama.cpp's Q8_0 activations.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils

GROUP = 32
_FEATURES = llvm_binding.get_host_cpu_features()
HAS_VNNI = bool(_FEATURES.get("avx512vnni") and _FEATURES.get("avx512bw"))
I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
V64I8, V16I32, V16F = ir.VectorType(I8, 64), ir.VectorType(I32, 16), ir.VectorType(F32, 16)


def are_c_arrays(*expected) -> bool:
    """Every (numba type, dtype, ndim) is a C-contiguous array of that dtype and ndim."""
    return all(isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"
               for a, dtype, ndim in expected)


def vector_at(context, builder, array_type, array, index, vector_type):
    """A pointer to a vector_type starting at element `index` of a C-contiguous array."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())


def shape_of(context, builder, array_type, array) -> list:
    return cgutils.unpack_tuple(builder, context.make_array(array_type)(context, builder, array).shape)


def dpbusd(builder, acc, unsigned_bytes, signed_bytes):
    """acc [16 x i32] + 4-byte dot products of [64 x u8] and [64 x s8]."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16I32, [V16I32, V64I8, V64I8]),
                                        "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, unsigned_bytes, signed_bytes])


@nb.njit(fastmath=True, cache=True)
def quantize_activations(x, xq_a, xq_b, dx_lanes, offset_lanes, is_split, offset_per_lane):
    """x [M, K] f32 -> int8 per group of 32, and per-lane copies of each group's scale.

    is_split: element 32g + j goes to xq_a[m, 16g + j] (j < 16) or xq_b[m, 16g + j - 16]
    (q4's nibble order); else to xq_a[m, 32g + j] (xq_b unused). dx_lanes [M, G * L] holds
    dx L times per group (L = the group's vpdpbusd lanes), offset_lanes the same places
    offset_per_lane * dx * sum(xq of the group) (a weight offset's term, spread over L).
    """
    lanes = dx_lanes.shape[1] // (x.shape[1] // GROUP)
    for m in range(x.shape[0]):
        for g in range(x.shape[1] // GROUP):
            amax = np.float32(0.0)
            for j in range(GROUP):
                amax = max(amax, abs(x[m, g * GROUP + j]))
            dx = amax / np.float32(127.0)
            inv = np.float32(1.0) / dx if dx > 0 else np.float32(0.0)
            total = 0
            for j in range(GROUP):
                v = np.int8(np.rint(x[m, g * GROUP + j] * inv))
                total += v
                if not is_split:
                    xq_a[m, g * GROUP + j] = v
                elif j < GROUP // 2:
                    xq_a[m, g * GROUP // 2 + j] = v
                else:
                    xq_b[m, g * GROUP // 2 + j - GROUP // 2] = v
            for r in range(lanes):
                dx_lanes[m, lanes * g + r] = dx
                offset_lanes[m, lanes * g + r] = np.float32(offset_per_lane) * dx * np.float32(total)


def dequantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] f32 as the VNNI kernels see it: int8 per group of 32 times its scale (fp32)."""
    m, k = x.shape
    xq, dx = np.empty((m, k), np.int8), np.empty((m, k // GROUP), np.float32)
    quantize_activations(x.numpy(), xq, xq, dx, np.empty_like(dx), False, np.float32(0.0))
    return (torch.from_numpy(xq).view(m, -1, GROUP).to(torch.float32) * torch.from_numpy(dx)[..., None]).reshape(m, k)
