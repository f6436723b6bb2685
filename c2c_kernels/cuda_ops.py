"""The device engine's kernels other than HybridGEMM (numba-cuda), on fp32 activations.

One forward step of `worker.device_model` runs these and `HybridWeight.matmul_device`
on device arrays only: embedding gather, add + RMSNorm, RoPE + paged KV write, paged
attention (prefill and decode alike: one block per query token and head, GQA, sliding
window), SwiGLU, bias, row gather, greedy argmax, MoE routing and weighted accumulate.

Simple first: one launch per op, no fusion beyond the pairs above. Shapes are in the
docstrings; caches are [layers, slots, kv_heads, head_dim] fp32 (slot = block * block_size
+ offset). Each `make_*` returns a plain function so tests compile it to sm_90 PTX.
`launch` refuses host (numpy) arrays: numba would copy them to the device and back on
every call, which is exactly the traffic this engine exists to avoid.

Under NUMBA_ENABLE_CUDASIM=1 blocks are a few threads (every simulated thread is a
Python thread) and the interpreter's thread switch interval is shortened: the simulator
hands control between its threads at every `syncthreads`, and at the default 5 ms
interval each hand-off took 5 ms.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from numba import cuda, float32, int32

from c2c_kernels.cuda_kernels import IS_SIMULATOR, _load_word, _unpack

if IS_SIMULATOR:
    sys.setswitchinterval(1e-4)
    THREADS = 2
else:
    THREADS = 128
ATTENTION_THREADS = 2 if IS_SIMULATOR else 64
MAX_TOP_K = 8


def make_embed(threads: int = THREADS):
    """out[t, :] = W[ids[t], :] widened; W bf16 words split like HybridGEMM's (w_dev rows
    [0, n_dev), w_host the rest). ids [T] int32, out [T, K4] f32."""

    def embed(ids, w_dev, w_host, n_dev, out):
        t = cuda.blockIdx.x
        row = ids[t]
        for kw in range(cuda.threadIdx.x, out.shape[1] // 4, threads):
            word = _load_word(w_dev, w_host, n_dev, row, kw)
            for j in range(4):
                out[t, 4 * kw + j] = _unpack(word, j)

    return embed


def make_add_rms_norm(threads: int = THREADS):
    """x[t] += delta[t] (when has_delta), then out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w.
    x, delta, out [T, H] f32; w [H] f32. One block per row."""

    def add_rms_norm(x, delta, has_delta, w, eps, out):
        t = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        partial = cuda.shared.array(threads, float32)
        acc = float32(0.0)
        for i in range(tid, x.shape[1], threads):
            v = x[t, i]
            if has_delta:
                v += delta[t, i]
                x[t, i] = v
            acc += v * v
        partial[tid] = acc
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:
            if tid < stride:
                partial[tid] += partial[tid + stride]
            cuda.syncthreads()
            stride //= 2
        scale = float32(1.0) / math.sqrt(partial[0] / float32(x.shape[1]) + eps)
        for i in range(tid, x.shape[1], threads):
            out[t, i] = w[i] * (x[t, i] * scale)

    return add_rms_norm


def make_rope_kv_write(threads: int = THREADS):
    """Rotate q and k of qkv [T, (nH + 2 nKV) D] in place (rotate-half RoPE, cos/sin tables
    [max_pos, D/2] f32), then write k and v of token t to slot slots[t] of the caches
    [L, slots, nKV, D] at `layer`. positions, slots [T] int32. One block per token."""

    def rope_kv_write(qkv, positions, slots, cos_tab, sin_tab, num_heads, num_kv_heads,
                      k_cache, v_cache, layer):
        t = cuda.blockIdx.x
        dim = k_cache.shape[3]
        half = dim // 2
        pos = positions[t]
        slot = slots[t]
        for i in range(cuda.threadIdx.x, (num_heads + num_kv_heads) * half, threads):
            head = i // half
            d = i % half
            c = cos_tab[pos, d]
            s = sin_tab[pos, d]
            x1 = qkv[t, head * dim + d]
            x2 = qkv[t, head * dim + d + half]
            r1 = x1 * c - x2 * s
            r2 = x2 * c + x1 * s
            qkv[t, head * dim + d] = r1
            qkv[t, head * dim + d + half] = r2
            if head >= num_heads:
                k_cache[layer, slot, head - num_heads, d] = r1
                k_cache[layer, slot, head - num_heads, d + half] = r2
        v0 = (num_heads + num_kv_heads) * dim
        for i in range(cuda.threadIdx.x, num_kv_heads * dim, threads):
            v_cache[layer, slot, i // dim, i % dim] = qkv[t, v0 + i]

    return rope_kv_write


def make_attention(threads: int = ATTENTION_THREADS, dims_per_thread: int = 2):
    """out[t, h*D:(h+1)*D] = softmax(q k^T * scale) v over the keys of token t's sequence
    at positions [max(0, p - window + 1), p] (window <= 0: no window), read through its
    block table. q from qkv [T, ...] (head h at columns h*D); caches [L, slots, nKV, D];
    positions, seq_of [T] int32; tables [S, max_blocks] int32; out [T, nH * D].

    Grid (T, nH); keys go in tiles of `threads`: each thread scores one key, then every
    thread folds the tile into its running max / sum (online softmax) and its own
    `dims_per_thread` output dimensions (D <= threads * dims_per_thread)."""

    max_dim = threads * dims_per_thread  # a constant: sizes the shared q vector

    def attention(qkv, k_cache, v_cache, layer, positions, seq_of, tables, block_size,
                  num_heads, window, scale, out):
        t = cuda.blockIdx.x
        h = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        dim = k_cache.shape[3]
        kv_head = h // (num_heads // k_cache.shape[2])
        q_s = cuda.shared.array(max_dim, float32)
        score_s = cuda.shared.array(threads, float32)
        slot_s = cuda.shared.array(threads, int32)
        acc = cuda.local.array(dims_per_thread, float32)
        for i in range(dims_per_thread):
            acc[i] = 0.0
            d = tid + i * threads
            if d < dim:
                q_s[d] = qkv[t, h * dim + d]
        cuda.syncthreads()
        pos = positions[t]
        seq = seq_of[t]
        low = 0
        if window > 0 and pos - window + 1 > 0:
            low = pos - window + 1
        run_max = float32(-math.inf)
        run_sum = float32(0.0)
        for k0 in range(low, pos + 1, threads):
            key = k0 + tid
            score = float32(-math.inf)
            if key <= pos:
                slot = tables[seq, key // block_size] * block_size + key % block_size
                slot_s[tid] = slot
                score = float32(0.0)
                for d in range(dim):
                    score += q_s[d] * k_cache[layer, slot, kv_head, d]
                score *= scale
            score_s[tid] = score
            cuda.syncthreads()
            tile_max = run_max
            for j in range(threads):
                tile_max = max(tile_max, score_s[j])
            correction = math.exp(run_max - tile_max)
            run_sum *= correction
            for i in range(dims_per_thread):
                acc[i] *= correction
            for j in range(threads):
                if k0 + j <= pos:
                    p = math.exp(score_s[j] - tile_max)
                    run_sum += p
                    for i in range(dims_per_thread):
                        d = tid + i * threads
                        if d < dim:
                            acc[i] += p * v_cache[layer, slot_s[j], kv_head, d]
            run_max = tile_max
            cuda.syncthreads()
        for i in range(dims_per_thread):
            d = tid + i * threads
            if d < dim:
                out[t, h * dim + d] = acc[i] / run_sum

    return attention


def make_silu_mul(threads: int = THREADS):
    """out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]; gate_up [T, 2I], out [T, I]."""

    def silu_mul(gate_up, out):
        inter = out.shape[1]
        for i in range(cuda.grid(1), out.shape[0] * inter, cuda.gridsize(1)):
            g = gate_up[i // inter, i % inter]
            out[i // inter, i % inter] = g / (float32(1.0) + math.exp(-g)) * gate_up[i // inter, inter + i % inter]

    return silu_mul


def make_add_bias(threads: int = THREADS):
    """y[m, n] += bias[n]; y [M, N] (a column view is fine), bias [N]."""

    def add_bias(y, bias):
        n_cols = y.shape[1]
        for i in range(cuda.grid(1), y.shape[0] * n_cols, cuda.gridsize(1)):
            y[i // n_cols, i % n_cols] += bias[i % n_cols]

    return add_bias


def make_fill(threads: int = THREADS):
    """x[:, :] = value."""

    def fill(x, value):
        n_cols = x.shape[1]
        for i in range(cuda.grid(1), x.shape[0] * n_cols, cuda.gridsize(1)):
            x[i // n_cols, i % n_cols] = value

    return fill


def make_gather_rows(threads: int = THREADS):
    """out[s, :] = x[rows[s], :]; x [T, H], rows [S] int32, out [S, H]. One block per row."""

    def gather_rows(x, rows, out):
        s = cuda.blockIdx.x
        for i in range(cuda.threadIdx.x, x.shape[1], threads):
            out[s, i] = x[rows[s], i]

    return gather_rows


def make_argmax(threads: int = THREADS):
    """ids[s] = argmax(logits[s, :]) (the lowest index among equal maxima); one block per row."""

    def argmax(logits, ids):
        s = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        best_v = cuda.shared.array(threads, float32)
        best_i = cuda.shared.array(threads, int32)
        v_max = float32(-math.inf)
        i_max = int32(0)
        for i in range(tid, logits.shape[1], threads):
            if logits[s, i] > v_max:
                v_max = logits[s, i]
                i_max = i
        best_v[tid] = v_max
        best_i[tid] = i_max
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:
            if tid < stride:
                other_v, other_i = best_v[tid + stride], best_i[tid + stride]
                if other_v > best_v[tid] or (other_v == best_v[tid] and other_i < best_i[tid]):
                    best_v[tid] = other_v
                    best_i[tid] = other_i
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            ids[s] = best_i[0]

    return argmax


def make_moe_route(threads: int = THREADS):
    """weights[t, e] = routing weight of expert e for token t: softmax over router_logits
    [T, E], the top_k kept (renormalized to sum 1 when asked), every other entry 0; adds
    1 to counts[0, e] (zeroed by the caller) per token routed to e. One thread per token."""

    def moe_route(router_logits, top_k, renormalize, weights, counts):
        num_experts = router_logits.shape[1]
        for t in range(cuda.grid(1), router_logits.shape[0], cuda.gridsize(1)):
            top = float32(-math.inf)
            for e in range(num_experts):
                top = max(top, router_logits[t, e])
                weights[t, e] = -1.0  # not chosen (a probability is never negative)
            total = float32(0.0)
            for e in range(num_experts):
                total += math.exp(router_logits[t, e] - top)
            kept = float32(0.0)
            for _ in range(top_k):
                best, best_e = float32(-math.inf), 0
                for e in range(num_experts):
                    if weights[t, e] < 0 and router_logits[t, e] > best:
                        best, best_e = router_logits[t, e], e
                prob = math.exp(best - top) / total
                weights[t, best_e] = prob
                kept += prob
                cuda.atomic.add(counts, (0, best_e), float32(1.0))
            for e in range(num_experts):
                w = weights[t, e]
                if w < 0:
                    weights[t, e] = 0.0
                elif renormalize:
                    weights[t, e] = w / kept

    return moe_route


def make_add_weighted(threads: int = THREADS):
    """out[t, :] += weights[t, col] * y[t, :] for tokens with a non-zero weight (an
    expert's output into the MoE sum); out, y [T, H], weights [T, E]."""

    def add_weighted(out, y, weights, col):
        n_cols = out.shape[1]
        for i in range(cuda.grid(1), out.shape[0] * n_cols, cuda.gridsize(1)):
            w = weights[i // n_cols, col]
            if w != 0.0:
                out[i // n_cols, i % n_cols] += w * y[i // n_cols, i % n_cols]

    return add_weighted


def make_add_sigmoid_gated(threads: int = THREADS):
    """out[t, :] += sigmoid(gate[t, 0]) * y[t, :] (Qwen2-MoE's shared expert)."""

    def add_sigmoid_gated(out, y, gate):
        n_cols = out.shape[1]
        for i in range(cuda.grid(1), out.shape[0] * n_cols, cuda.gridsize(1)):
            g = float32(1.0) / (float32(1.0) + math.exp(-gate[i // n_cols, 0]))
            out[i // n_cols, i % n_cols] += g * y[i // n_cols, i % n_cols]

    return add_sigmoid_gated


# name -> kernel factory; blocks per launch are the caller's
KERNELS = {
    "embed": make_embed, "add_rms_norm": make_add_rms_norm, "rope_kv_write": make_rope_kv_write,
    "silu_mul": make_silu_mul, "add_bias": make_add_bias, "fill": make_fill,
    "gather_rows": make_gather_rows, "argmax": make_argmax, "moe_route": make_moe_route,
    "add_weighted": make_add_weighted, "add_sigmoid_gated": make_add_sigmoid_gated,
}
_jitted: dict[tuple, object] = {}


def kernel(name: str, **config):
    """The jitted kernel `name` ("attention" takes dims_per_thread) with the default threads."""
    key = (name, tuple(sorted(config.items())))
    if key not in _jitted:
        factory = make_attention if name == "attention" else KERNELS[name]
        _jitted[key] = cuda.jit(factory(**config))
    return _jitted[key]


def attention_dims_per_thread(head_dim: int) -> int:
    return -(-head_dim // ATTENTION_THREADS)


def launch(name: str, grid, *args, **config) -> None:
    """Launch kernel `name` on `grid` blocks of its threads; TypeError for a host array."""
    for arg in args:
        if isinstance(arg, np.ndarray):
            raise TypeError(f"{name}: a host array was passed; kernels take device arrays only")
    threads = ATTENTION_THREADS if name == "attention" else THREADS
    kernel(name, **config)[grid, threads](*args)


def grid_for(num_items: int) -> int:
    """Blocks for a grid-stride kernel over num_items elements (capped: they loop)."""
    return max(1, min(-(-num_items // THREADS), 4 if IS_SIMULATOR else 1024))
