"""CPU paged decode attention: one query token per sequence, straight over the KV blocks.

Why a kernel and not torch: at decode the work per layer is tiny (batch 1, 14 heads, a
few hundred keys), and torch's path costs far more than the arithmetic: two block
gathers, a GQA-expanding `scaled_dot_product_attention`, and, with more than one torch
thread, an OpenMP wake-up per op (~50 us each on a small VM; 86 us vs 30 us per SDPA
call measured at batch 1). Here one call writes the step's k/v into the cache and
attends, reading each cached key and value row once for all query heads of its group.

Layout (as `worker.model.KVCache`): k_cache, v_cache [num_blocks, block_size, nKV, D]
fp32; q [S, nH, D] fp32 with nH = group * nKV (query head j uses kv head j // group);
block_tables [S, Bmax] int64; lows, lens [S] int64: sequence s attends key positions
[lows[s], lens[s]) (a sliding window sets lows). Softmax in fp32 with the running max
subtracted, the same maths as SDPA's math path.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

from c2c_kernels.cpu_gemv import PARALLEL_LOCK

# Below this many multiply-adds a call runs on the calling thread: waking the thread
# pool costs more than the arithmetic.
SERIAL_MAX_FMAS = 1 << 21


@nb.njit(fastmath=True, inline="always")
def _attend_one(q, k_cache, v_cache, table, lo, hi, h, group, scale, out, s):
    """out[s, h*group:(h+1)*group] = softmax(q K^T * scale) V over positions [lo, hi)."""
    block_size, dim = k_cache.shape[1], k_cache.shape[3]
    n = hi - lo
    scores = np.empty((group, n), dtype=np.float32)
    for i in range(n):
        pos = lo + i
        krow = k_cache[table[pos // block_size], pos % block_size, h]
        for g in range(group):
            qrow = q[s, h * group + g]
            acc = np.float32(0.0)
            for d in range(dim):
                acc += qrow[d] * krow[d]
            scores[g, i] = acc * scale
    for g in range(group):
        top = scores[g].max()
        total = np.float32(0.0)
        for i in range(n):
            e = np.exp(scores[g, i] - top)
            scores[g, i] = e
            total += e
        inv = np.float32(1.0) / total
        for i in range(n):
            scores[g, i] *= inv
    for g in range(group):
        out[s, h * group + g, :] = 0.0
    for i in range(n):
        pos = lo + i
        vrow = v_cache[table[pos // block_size], pos % block_size, h]
        for g in range(group):
            orow = out[s, h * group + g]
            p = scores[g, i]
            for d in range(dim):
                orow[d] += p * vrow[d]


@nb.njit(fastmath=True, inline="always")
def _write_new(k_new, v_new, k_cache, v_cache, slots, s, h):
    block_size = k_cache.shape[1]
    slot = slots[s]
    k_cache[slot // block_size, slot % block_size, h, :] = k_new[s, h]
    v_cache[slot // block_size, slot % block_size, h, :] = v_new[s, h]


@nb.njit(fastmath=True, cache=True)
def decode_attention_serial(q, k_new, v_new, k_cache, v_cache, slots, tables, lows, lens, scale, out):
    """Write k_new/v_new [S, nKV, D] at `slots` [S], then attend; on the calling thread."""
    num_kv = k_cache.shape[2]
    group = q.shape[1] // num_kv
    for s in range(q.shape[0]):
        for h in range(num_kv):
            _write_new(k_new, v_new, k_cache, v_cache, slots, s, h)
            _attend_one(q, k_cache, v_cache, tables[s], lows[s], lens[s], h, group, scale, out, s)


@nb.njit(parallel=True, fastmath=True, cache=True)
def decode_attention_parallel(q, k_new, v_new, k_cache, v_cache, slots, tables, lows, lens, scale, out):
    """decode_attention_serial with the (sequence, kv head) pairs spread over threads.

    No races: a task writes only its own sequence's new slot (a block no other running
    sequence writes) and reads only its own sequence's blocks.
    """
    num_kv = k_cache.shape[2]
    group = q.shape[1] // num_kv
    for task in nb.prange(q.shape[0] * num_kv):
        s, h = task // num_kv, task % num_kv
        _write_new(k_new, v_new, k_cache, v_cache, slots, s, h)
        _attend_one(q, k_cache, v_cache, tables[s], lows[s], lens[s], h, group, scale, out, s)


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     tables: torch.Tensor, lows: torch.Tensor, lens: torch.Tensor,
                     max_keys: int) -> torch.Tensor:
    """q [S, nH, D], k_new/v_new [S, nKV, D] fp32 -> [S, nH, D] fp32; writes the cache.

    max_keys (the most keys one sequence attends) sizes the work: serial below the cut-off.
    """
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [S, nH, D]
    args = (q.contiguous().numpy(), k_new.contiguous().numpy(), v_new.contiguous().numpy(),
            k_cache.numpy(), v_cache.numpy(), slots.numpy(), tables.numpy(), lows.numpy(),
            lens.numpy(), np.float32(1.0 / math.sqrt(q.shape[-1])), out.numpy())
    num_fmas = 2 * q.shape[0] * q.shape[1] * q.shape[2] * max_keys
    if num_fmas < SERIAL_MAX_FMAS or torch.get_num_threads() == 1:
        decode_attention_serial(*args)
    else:
        with PARALLEL_LOCK:
            decode_attention_parallel(*args)
    return out
