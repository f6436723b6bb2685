"""CPU RMSNorm (with the residual add fused in) and in-place RoPE, as serial Numba loops.

Why: at decode these run on one token of a few hundred to a few thousand floats, where a
chain of torch ops costs ~13 us (rms_norm: pow, mean, add, rsqrt, two muls, each a
dispatch and a fresh tensor) against well under 1 us of arithmetic; a 0.5B model calls
them ~100 times a step. Same maths and the same fp32 order of operations as the torch
versions `kernels.rms_norm` and `kernels.apply_rope` (the reference and the non-CPU path):

    rms_norm(x) = w * (x * rsqrt(mean(x^2) + eps))
    rope(x)     = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]

Norm weights are fp32 (the model widens its few norm vectors once, at build).
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(fastmath=True, cache=True)
def add_rms_norm(x, delta, w, eps, out, has_delta):
    """x [T, H] += delta [T, H] (when has_delta) in place, then out [T, H] = rms_norm(x); w [H] f32."""
    num_tokens, hidden = x.shape
    for t in range(num_tokens):
        xr = x[t]
        if has_delta:
            dr = delta[t]
            for j in range(hidden):
                xr[j] += dr[j]
        total = np.float32(0.0)
        for j in range(hidden):
            total += xr[j] * xr[j]
        scale = np.float32(1.0) / np.sqrt(total / np.float32(hidden) + np.float32(eps))
        orow = out[t]
        for j in range(hidden):
            orow[j] = w[j] * (xr[j] * scale)


@nb.njit(fastmath=True, cache=True)
def rope_inplace(x, cos, sin):
    """x [T, heads, D] (any strides) = x * cos + rotate_half(x) * sin; cos, sin [T, D]."""
    num_tokens, num_heads, dim = x.shape
    half = dim // 2
    for t in range(num_tokens):
        c, s = cos[t], sin[t]
        for h in range(num_heads):
            row = x[t, h]
            for j in range(half):
                a, b = row[j], row[j + half]
                row[j] = a * c[j] - b * s[j]
                row[j + half] = b * c[j + half] + a * s[j + half]
