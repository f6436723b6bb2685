"""HybridGEMM: y = x @ W.T with W streamed from host memory (CPU path here, CUDA in
`c2c_kernels.cuda_backend`).

`linear` is what every linear layer and the LM head of the engine calls:
- fp32 weights: torch `F.linear` (MKL streams fp32 at memory bandwidth);
- bf16/fp16 weights, M <= decode threshold: the Numba output-stationary GEMV
  (`cpu_gemv`), weights read once, widened in registers, fp32 accumulation;
- bf16/fp16 weights, larger M: the prefill path (`cpu_gemm`), the fastest of a
  weight-stationary Numba kernel and torch, chosen per shape;
- a weight object with a `hybrid_linear(x, bias)` method (the CUDA `HybridWeight`,
  `Int8Weight`, int8 per-channel quantized weights, or `Q4Weight`, 4-bit groups of 32):
  delegated to it.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from c2c_kernels import cpu_attention, cpu_pointwise, serial_or_threaded
from c2c_kernels.cpu_gemm import _numba_ws, prefill_linear
from c2c_kernels.cpu_gemv import (
    PARALLEL_LOCK,
    gemm_skinny,
    gemm_skinny_serial,
    gemv_m1,
    gemv_m1_serial,
    grouped_gemv_m1,
)

_decode_threshold = 16
# Below this many weight bytes x M a decode call always runs on the calling thread:
# waking the thread pool (~50 us on the 2-core VM) costs more than the read. Above it, a
# one-token GEMV (memory-bound) runs the way `serial_or_threaded` measures faster (a busy
# machine favours serial); a batch (M > 1, compute-bound: two threads also get a larger
# share of a busy CPU) runs threaded from SKINNY_SERIAL_MAX_BYTES up, as before. Measured
# on the loaded 2-core VM (0.5B, load average 3-4): batch-8 steps were 287 ms with that
# rule vs 331 ms with the measured choice; batch 1 gained (decode 8.3 -> 10.1 tok/s).
SERIAL_MAX_BYTES = 512 * 1024
SKINNY_SERIAL_MAX_BYTES = 4 * 1024 * 1024
_WAYS = serial_or_threaded.SerialOrThreaded()
# each quantized format measures its own kernels (their speed per byte differs from bf16's)
_QUANTIZED_WAYS = {"int8": serial_or_threaded.SerialOrThreaded(), "q4": serial_or_threaded.SerialOrThreaded()}
_thread_state = threading.local()  # numba's thread count is a per-thread setting

_WIDENED = (torch.bfloat16, torch.float16)


def set_decode_threshold(m: int) -> None:
    """The kernel-path knob: M <= m runs output-stationary (decode), larger M prefill."""
    global _decode_threshold
    _decode_threshold = max(0, int(m))


def decode_threshold() -> int:
    return _decode_threshold


def _sync_threads() -> int:
    """Numba uses as many threads as torch (a CPU slice sets torch's count); returns it."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_thread_state, "num_threads", -1) != n:
        numba.set_num_threads(n)
        _thread_state.num_threads = n
    return n


def _numpy16(w: torch.Tensor) -> np.ndarray:
    """w [N, K] bf16 -> uint16 bit view; fp16 -> int16 bit view (zero-copy; see _widen)."""
    if w.dtype == torch.bfloat16:
        return w.view(torch.uint16).numpy()
    return w.view(torch.int16).numpy()


def _decode_linear(x: torch.Tensor, w: torch.Tensor, w16: np.ndarray, num_threads: int):
    """Output-stationary path; x [M, K] f32 contiguous, M >= 1 -> y [M, N] f32."""
    m = x.shape[0]
    work = w16.nbytes * m  # the arithmetic grows with M, so threads pay off sooner for a batch
    y = torch.empty(m, w.shape[0], dtype=torch.float32)  # [M, N]; 1-3 tail rows: no padding
    if work < SERIAL_MAX_BYTES or num_threads == 1 or m > 1:
        is_serial = work < (SERIAL_MAX_BYTES if m == 1 else SKINNY_SERIAL_MAX_BYTES) or num_threads == 1
        _run_decode(x.numpy(), w16, y.numpy(), m, is_serial, num_threads)
        return y
    key, is_serial = _WAYS.choose(work)
    start_s = time.perf_counter()
    _run_decode(x.numpy(), w16, y.numpy(), m, is_serial, num_threads)
    _WAYS.record(key, is_serial, time.perf_counter() - start_s, work)
    return y


def _run_decode(x: np.ndarray, w16: np.ndarray, y: np.ndarray, m: int, is_serial: bool, num_threads: int):
    if is_serial:
        (gemv_m1_serial if m == 1 else gemm_skinny_serial)(x, w16, y)
        return
    with PARALLEL_LOCK:
        (gemv_m1 if m == 1 else gemm_skinny)(x, w16, y, num_threads)


def decode_ways() -> dict[int, str]:
    """The serial/threaded decisions so far, per size class (for benchmarks and logs)."""
    return _WAYS.summary()


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias) in fp32.

    x [..., K] (any float dtype, any strides), w [N, K] bf16/fp16/fp32 tensor or a
    HybridWeight; bias [N] or None. Returns [..., N] fp32, contiguous. M = 0 is fine.
    Raises ValueError when K of x and w differ.
    """
    if not isinstance(w, torch.Tensor):  # a HybridWeight (CUDA path)
        return w.hybrid_linear(x, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    if w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"linear: x has K={k} but w has shape {tuple(w.shape)}")
    if _is_plain_2d(x):
        y = _linear_2d(x, w)  # [M, N]; the engine's case: no reshape, no copy
    else:
        y = _linear_2d(x.detach().reshape(-1, k).to(torch.float32).contiguous(), w)
    if bias is not None:
        y += bias  # bf16 bias promoted to fp32 in place
    return y if len(lead) == 1 else y.reshape(*lead, w.shape[0])


@dataclass(frozen=True)
class Int8Weight:
    """A weight quantized per output channel (`cpu_int8`): w[n] ~ q[n] * scale[n].

    q [N, K] int8 and scale [N] fp32, e.g. read-only views of the host store. `linear`
    delegates to `hybrid_linear`: decode reads the int8 bytes (serial or threaded as for
    bf16), prefill multiplies by the dequantized fp32 matrix.
    """

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q, self.scale

    def hybrid_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _quantized_linear(self, x, bias)

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        from c2c_kernels.cpu_int8 import prefill_int8

        return prefill_int8(x, self.q, self.scale)

    def _decode(self, x: torch.Tensor, num_threads: int) -> torch.Tensor:
        from c2c_kernels import cpu_int8

        y = torch.empty(x.shape[0], self.q.shape[0], dtype=torch.float32)  # [M, N]
        weight = (self.q.numpy(), self.scale.numpy(), y.numpy())
        if cpu_int8.uses_vnni(*x.shape):  # activations rounded to int8 per group (cpu_int8)
            args = (*cpu_int8.vnni_activations(x.numpy()), *weight)
            _quantized_decode(cpu_int8.gemv_int8_vnni_serial, cpu_int8.gemv_int8_vnni, args, self.q.numel(),
                              self.q.numel(), num_threads, _QUANTIZED_WAYS["int8"])
        else:
            _quantized_decode(cpu_int8.gemv_int8_serial, cpu_int8.gemv_int8, (x.numpy(), *weight), self.q.numel(),
                              self.q.numel(), num_threads, _QUANTIZED_WAYS["int8"])
        return y


@dataclass(frozen=True)
class Q4Weight:
    """A weight quantized to 4 bits in groups of 32 (`cpu_q4`, GGUF Q4_0 numbers).

    qs [N, K/2] uint8 (two weights a byte) and scale [N, K/32] fp16, e.g. read-only views
    of the host store or of a GGUF file's tensors. Decode reads the packed bytes; prefill
    multiplies by the dequantized fp32 matrix a block of rows at a time.
    """

    qs: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qs.shape[0], 2 * self.qs.shape[1]))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qs, self.scale

    def hybrid_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _quantized_linear(self, x, bias)

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        from c2c_kernels.cpu_q4 import prefill_q4

        return prefill_q4(x, self.qs, self.scale)

    def _decode(self, x: torch.Tensor, num_threads: int) -> torch.Tensor:
        from c2c_kernels import cpu_q4

        y = torch.empty(x.shape[0], self.qs.shape[0], dtype=torch.float32)  # [M, N]
        weight = (self.qs.numpy(), self.scale.view(torch.int16).numpy(), y.numpy())
        nbytes = self.qs.numel() + 2 * self.scale.numel()
        if cpu_q4.can_use_vnni(x.shape[1]):  # activations rounded to int8 per group (cpu_q4)
            args = (*cpu_q4.vnni_activations(x.numpy()), *weight)
            _quantized_decode(cpu_q4.gemv_q4_vnni_serial, cpu_q4.gemv_q4_vnni, args, nbytes, 2 * self.qs.numel(),
                              num_threads, _QUANTIZED_WAYS["q4"])
        else:
            _quantized_decode(cpu_q4.gemv_q4_serial, cpu_q4.gemv_q4, (x.numpy(), *weight), nbytes,
                              2 * self.qs.numel(), num_threads, _QUANTIZED_WAYS["q4"])
        return y


QUANTIZED = (Int8Weight, Q4Weight)


def _quantized_linear(weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`hybrid_linear` of a quantized weight: x [..., K] -> [..., N] fp32 (+ bias)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has K={x.shape[-1]} but w has shape {tuple(weight.shape)}")
    x2 = x.detach().reshape(-1, k).to(torch.float32).contiguous()  # [M, K]
    if x2.shape[0] == 0 or x2.shape[0] > _decode_threshold:
        y = weight._prefill(x2)  # [M, N]
    else:
        y = weight._decode(x2, _sync_threads())
    if bias is not None:
        y += bias
    return y if len(lead) == 1 else y.reshape(*lead, n)


def _quantized_decode(serial, threaded, args: tuple, nbytes: int, num_elements: int, num_threads: int,
                      ways: serial_or_threaded.SerialOrThreaded) -> None:
    """Run a quantized decode kernel, args = (activations..., weight arrays..., y [M, N]),
    serial or threaded by the bf16 rules (`_decode_linear`).

    nbytes: the weight's stored bytes; a one-token call's measured choice (`ways`, the
    format's own) is keyed by the bf16 bytes of the same matrix (2 * num_elements).
    """
    m = args[-1].shape[0]
    read_bytes, bf16_work = nbytes * m, 2 * num_elements * m
    if read_bytes < SERIAL_MAX_BYTES or num_threads == 1 or m > 1:
        if (read_bytes < SERIAL_MAX_BYTES if m == 1 else bf16_work < SKINNY_SERIAL_MAX_BYTES) or num_threads == 1:
            serial(*args)
        else:
            with PARALLEL_LOCK:
                threaded(*args, num_threads)
        return
    key, is_serial = ways.choose(bf16_work)
    start_s = time.perf_counter()
    if is_serial:
        serial(*args)
    else:
        with PARALLEL_LOCK:
            threaded(*args, num_threads)
    ways.record(key, is_serial, time.perf_counter() - start_s, bf16_work)


def warmup_quantized(mode: str) -> None:
    """Load (or compile, the first time on a machine) the kernels of one quantize mode
    ("int8" | "q4"); they stay out of `warmup` so models without quantized weights pay no
    compile time for them."""
    from c2c_kernels.cpu_int8 import quantize_int8
    from c2c_kernels.cpu_q4 import quantize_q4

    kind, quantize = {"int8": (Int8Weight, quantize_int8), "q4": (Q4Weight, quantize_q4)}[mode]
    widths = (128, 96) if mode == "q4" else (64, 48)  # the VNNI kernel (K % 128 or 64 == 0) and the fp32 one
    for k, is_read_only in itertools.product(widths, (False, True)):  # host-store views are read-only:
        parts = quantize(torch.randn(2 * SERIAL_MAX_BYTES // k + 8, k))  # another Numba type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable" tensors: on purpose
            weight = kind(*(_read_only(p, is_read_only) for p in parts))
        for m, way in itertools.product((1, 3, _decode_threshold + 1), ("serial", "threaded")):  # + prefill
            previous, serial_or_threaded.FORCED = serial_or_threaded.FORCED, way
            try:
                weight.hybrid_linear(torch.randn(m, k))
            finally:
                serial_or_threaded.FORCED = previous
    _QUANTIZED_WAYS[mode].stats.clear()  # the timings above include loading the code


def _read_only(t: torch.Tensor, is_read_only: bool) -> torch.Tensor:
    """A copy of t over a numpy array that is read-only or not (as host-store views are)."""
    a = t.contiguous().view(torch.uint8).numpy().copy()
    a.setflags(write=not is_read_only)
    return torch.from_numpy(a).view(t.dtype)


def _is_plain_2d(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad


def _linear_2d(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m = x.shape[0]
    w = w.detach()
    if w.dtype not in _WIDENED or m == 0 or w.shape[0] == 0:
        return F.linear(x, w.to(torch.float32))  # fp32 weights (no copy), or empty shapes
    if not w.is_contiguous():
        w = w.contiguous()
    num_threads = _sync_threads()
    w16 = _numpy16(w)
    if m <= _decode_threshold:
        return _decode_linear(x, w, w16, num_threads)
    return prefill_linear(x, w, w16)


def _is_cpu_f32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and not t.is_cuda for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight with torch ops, any dtype and device; x [T, H]."""
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with torch ops, as a new tensor; x [T, heads, D], cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream), then RMSNorm(x) * weight as a new tensor.

    x, delta [T, H] fp32, weight [H] fp32 (the model widens its norm weights once).
    Serial Numba on the CPU (`c2c_kernels.cpu_pointwise`); `rms_norm` elsewhere.
    """
    tensors = (x, weight) if delta is None else (x, weight, delta)
    if not (_is_cpu_f32(*tensors) and all(t.is_contiguous() for t in tensors)):
        if delta is not None:
            x += delta
        return rms_norm(x, weight, eps)
    out = torch.empty_like(x)  # [T, H]
    x2, out2 = x.view(-1, x.shape[-1]).numpy(), out.view(-1, x.shape[-1]).numpy()
    delta2 = x2 if delta is None else delta.view(-1, x.shape[-1]).numpy()
    cpu_pointwise.add_rms_norm(x2, delta2, weight.numpy(), np.float32(eps), out2, delta is not None)
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place: x [T, heads, D] fp32 (a view is fine), cos/sin [T, 1, D]."""
    if not _is_cpu_f32(x, cos, sin):
        return x.copy_(apply_rope(x, cos, sin))
    cpu_pointwise.rope_inplace(x.numpy(), cos[:, 0].numpy(), sin[:, 0].numpy())
    return x


def can_use_decode_attention(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel covers fp32 queries and an fp32 cache on the CPU (the engine's default)."""
    return _is_cpu_f32(q, k_cache)


def decode_attention(q, k_new, v_new, k_cache, v_cache, slots, tables, lows, lens, max_keys: int) -> torch.Tensor:
    """Paged decode attention on the CPU (`c2c_kernels.cpu_attention`); writes the new k/v.

    q [S, nH, D], k_new/v_new [S, nKV, D], caches [num_blocks, block_size, nKV, D] fp32,
    slots [S], tables [S, Bmax], lows/lens [S] int64, max_keys = max(lens - lows) (known
    once per step, the same for every layer) -> [S, nH, D] fp32.
    """
    _sync_threads()
    return cpu_attention.decode_attention(q, k_new, v_new, k_cache, v_cache, slots, tables, lows, lens,
                                          max_keys)


def warmup() -> None:
    """Load every CPU kernel's compiled code (Numba cache) now, not on a first request.

    Runs each decode variant (serial/parallel GEMV, skinny GEMM), the weight-stationary
    prefill kernel, both decode attention kernels, the norm and RoPE once on small
    inputs; about 0.5 s saved on a first call.
    """
    for dtype in _WIDENED:
        for n in (8, 2 * SERIAL_MAX_BYTES // 256 + 8):  # below / above the serial cut-off
            w = torch.randn(n, 128).to(dtype)  # [N, K]
            for m in (1, 4):
                for is_serial in (True, False):
                    _run_decode(torch.randn(m, 128).numpy(), _numpy16(w), torch.empty(m, n).numpy(), m,
                                is_serial, 2)
        _numba_ws(torch.randn(32, 128), w, _numpy16(w))
    x, w, cos = torch.randn(2, 8), torch.ones(8), torch.randn(2, 1, 8)
    add_rms_norm(x, None, w, 1e-6)
    add_rms_norm(x, x.clone(), w, 1e-6)
    rope_(x.view(2, 1, 8), cos, cos)
    rope_(torch.randn(2, 16)[:, :8].view(2, 1, 8), cos, cos)  # a strided q view, as the model passes
    for dtype in _WIDENED:  # MoE decode groups: top-2 and top-4 models, fused gate|up or not
        for g in (2, 4, 8):
            grouped_linear_m1(torch.randn(g, 16), [torch.randn(8, 16).to(dtype) for _ in range(g)])
    cache = torch.zeros(2, 4, 1, 8)  # [num_blocks, block_size, nKV, D]
    tables, lows, lens = torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([5])
    for fn in (cpu_attention.decode_attention_serial, cpu_attention.decode_attention_parallel):
        q, kv = torch.randn(1, 2, 8), torch.randn(1, 1, 8)  # [S, nH, D], [S, nKV, D]
        fn(q.numpy(), kv.numpy(), kv.numpy(), cache.numpy(), cache.clone().numpy(),
           torch.tensor([4]).numpy(), tables.numpy(), lows.numpy(), lens.numpy(),
           np.float32(0.35), torch.empty_like(q).numpy())
    _WAYS.stats.clear()  # the timings above include loading the code: not the machine's speed


def can_group_m1(ws: Sequence) -> bool:
    """grouped_linear_m1 takes these: CPU bf16/fp16 contiguous matrices, one dtype, one N."""
    first = ws[0]
    return all(isinstance(w, torch.Tensor) and w.dtype in _WIDENED and w.dtype == first.dtype
               and w.dim() == 2 and w.shape[0] == first.shape[0] and w.is_contiguous() and not w.is_cuda
               for w in ws)


def grouped_linear_m1(xs: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """[xs[g] @ ws[g].T for every g] as one [G, N] fp32 tensor, in one parallel region.

    xs [G, K] (one row per matrix; fp32), ws G matrices [N, K] that `can_group_m1`
    accepts. Raises ValueError when K of xs and ws differ.
    """
    if any(w.shape[1] != xs.shape[1] for w in ws) or xs.shape[0] != len(ws):
        raise ValueError(f"grouped_linear_m1: xs {tuple(xs.shape)} vs {[tuple(w.shape) for w in ws]}")
    num_threads = _sync_threads()
    x2 = xs.detach().to(torch.float32).contiguous()  # [G, K]
    y = torch.empty(len(ws), ws[0].shape[0], dtype=torch.float32)  # [G, N]
    tasks_per_group = -(-num_threads // len(ws))
    with PARALLEL_LOCK:
        grouped_gemv_m1(x2.numpy(), tuple(_numpy16(w) for w in ws), y.numpy(), tasks_per_group)
    return y


def grouped_linear(xs: Sequence[torch.Tensor], ws: Sequence) -> list[torch.Tensor]:
    """[linear(x_i, w_i)] for MoE experts: only the listed experts' weights are read.

    xs[i] [M_i, K] holds the tokens routed to expert i (grouped, so each expert's
    weights stream once for all its tokens); experts with no tokens should be left out.
    """
    return [linear(x, w) for x, w in zip(xs, ws, strict=True)]


def group_by_expert(topk_ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Group routed (token, slot) pairs per expert.

    topk_ids [T, k] int -> [(expert_id, token_idx [n] int64, slot_idx [n] int64)] for
    every expert that received at least one token, in expert order.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)  # [T*k]
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    k = topk_ids.shape[1]
    groups, start = [], 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        idx = order[start : start + count]
        groups.append((expert, idx // k, idx % k))
        start += count
    return groups


def moe_linear(x, expert_ws, topk_ids, topk_weights) -> torch.Tensor:
    """sum_j topk_weights[t, j] * linear(x[t], expert_ws[topk_ids[t, j]]); x [T, K] -> [T, N].

    Reads only the selected experts' weights, each once for all of its tokens.
    """
    n = expert_ws[0].shape[0]
    out = torch.zeros(x.shape[0], n, dtype=torch.float32)  # [T, N]
    for expert, token_idx, slot_idx in group_by_expert(topk_ids):
        y = linear(x[token_idx], expert_ws[expert])  # [n_e, N]
        weights = topk_weights[token_idx, slot_idx].to(torch.float32)[:, None]  # [n_e, 1]
        out.index_put_((token_idx,), y * weights, accumulate=True)  # not index_add_ (see worker.moe)
    return out
