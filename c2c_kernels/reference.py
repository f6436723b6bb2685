"""float64 references for the kernels' tests: slow, obviously right."""

from __future__ import annotations

import numpy as np
import torch


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias) in float64; x [M, K], w [N, K] any float dtype; y [M, N] f64."""
    y = x.to(torch.float64) @ w.to(torch.float64).T  # [M, N]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float64 (the CUDA tests hold weights as raw bits)."""
    wide = bits.astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32).astype(np.float64)


def linear_bits_ref(x: np.ndarray, w_bits: np.ndarray) -> np.ndarray:
    """y = x @ bf16(w_bits).T in float64; x [M, K], w_bits [N, K] uint16; y [M, N]."""
    return x.astype(np.float64) @ bf16_bits_to_f64(w_bits).T


def moe_ref(x, expert_ws, topk_ids, topk_weights) -> torch.Tensor:
    """sum_j topk_weights[t, j] * (x[t] @ expert_ws[topk_ids[t, j]].T) in float64.

    x [T, K]; expert_ws: list of [N, K]; topk_ids, topk_weights [T, k]; returns [T, N].
    """
    out = torch.zeros(x.shape[0], expert_ws[0].shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            w = expert_ws[int(topk_ids[t, j])].to(torch.float64)
            out[t] += float(topk_weights[t, j]) * (x[t].to(torch.float64) @ w.T)
    return out
