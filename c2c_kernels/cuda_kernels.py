"""HybridGEMM CUDA kernels (numba-cuda): y[M, N] = x[M, K] @ W[N, K].T, W bf16 split by ρ.

W is split along output rows: rows [0, n_dev) are also cached in device memory
(`w_dev`), rows [n_dev, N) are read from host memory mapped into the device address
space (`w_host`, zero-copy over the link). Row split, not K split, because every
output element then comes from one source with no cross-source reduction, and the
cached part is one contiguous slice of W (caching = one copy of a byte range).

Both sources are read in the same launch, at the same time, so their bandwidths add:
blocks are persistent (grid-stride loop; `num_blocks` also emulates a MIG slice by
limiting the blocks launched) and walk the row tiles in an interleaved order
(`_tile_of`) in which device tiles and host tiles alternate in the ratio ρ : 1-ρ.

Two paths:
- output-stationary (`make_os_kernel`, decode, M <= max_m): a block owns one output
  row at a time; its threads stride over K, each weight element is read once and
  applied to all M tokens; a shared-memory tree reduction finishes the row.
- weight-stationary (`make_ws_kernel`, prefill): a block owns a tile of `tn` rows and
  `tm` tokens (one per thread); each [tn, tk] weight tile is read once per `tm` tokens
  into shared memory and applied to all of them.

Weights travel as 64-bit words of 4 bf16 each (W's bytes viewed as uint64 [rows, K/4];
K padded to a multiple of 4 by the caller), so a thread's load moves 8 bytes, and the
OS kernel issues two independent loads per step to keep more bytes in flight. The
widen is `bits << 16` reinterpreted as fp32 (libdevice int_as_float on the device; a
numpy view in the simulator, which has no libdevice). Accumulation is fp32. The kernel factories return plain Python functions
so tests can `cuda.compile_ptx` them for sm_90 without a GPU.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda, float32

IS_SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

if IS_SIMULATOR:

    def _widen_py(u):
        return np.array([np.uint32(u) << np.uint32(16)], dtype=np.uint32).view(np.float32)[0]

else:
    from numba.cuda import libdevice

    def _widen_py(u):
        return libdevice.int_as_float(np.int32(np.uint32(u) << np.uint32(16)))


widen = cuda.jit(device=True, inline=True)(_widen_py)


@cuda.jit(device=True, inline=True)
def _tile_of(t, num_tiles, num_dev_tiles):
    """Interleave: the t-th tile processed -> tile index, device tiles spread evenly.

    Among the first t processed tiles, floor(t * D / T) are device tiles (D of T), so at
    any moment the running blocks read both sources in the ratio ρ : 1-ρ.
    """
    d_before = (t * num_dev_tiles) // num_tiles
    d_after = ((t + 1) * num_dev_tiles) // num_tiles
    if d_after > d_before:
        return d_before
    return num_dev_tiles + t - d_before


@cuda.jit(device=True, inline=True)
def _load_word(w_dev, w_host, n_dev, row, kw):
    """Word kw (bf16 elements 4kw..4kw+3) of W's row, from whichever part holds the row."""
    if row < n_dev:
        return w_dev[row, kw]
    return w_host[row - n_dev, kw]


@cuda.jit(device=True, inline=True)
def _unpack(word, j):
    """The j-th bf16 (little-endian) of a 64-bit word, as fp32."""
    return widen((word >> np.uint64(16 * j)) & np.uint64(0xFFFF))


def make_os_kernel(threads: int = 256, max_m: int = 16):
    """Output-stationary kernel function for blocks of `threads` (a power of two), M <= max_m.

    Signature: (x [M, K4] f32, w_dev [>=1, K4/4] u64, w_host [>=1, K4/4] u64, n_dev,
    y [M, N] f32).
    """

    def os_kernel(x, w_dev, w_host, n_dev, y):
        m_rows = x.shape[0]
        k_words = x.shape[1] // 4
        n_rows = y.shape[1]
        tid = cuda.threadIdx.x
        partial = cuda.shared.array((max_m, threads), float32)
        acc = cuda.local.array(max_m, float32)
        for t in range(cuda.blockIdx.x, n_rows, cuda.gridDim.x):
            row = _tile_of(t, n_rows, n_dev)
            for m in range(max_m):
                acc[m] = 0.0
            for kw0 in range(tid, k_words, 2 * threads):
                kw1 = kw0 + threads
                word0 = _load_word(w_dev, w_host, n_dev, row, kw0)
                word1 = np.uint64(0)  # zero bits widen to +0.0: adds nothing
                if kw1 < k_words:
                    word1 = _load_word(w_dev, w_host, n_dev, row, kw1)
                for j in range(4):
                    w0 = _unpack(word0, j)
                    w1 = _unpack(word1, j)
                    for m in range(max_m):  # constant trip count: acc stays in registers
                        if m < m_rows:
                            acc[m] += w0 * x[m, 4 * kw0 + j]
                            if kw1 < k_words:
                                acc[m] += w1 * x[m, 4 * kw1 + j]
            for m in range(max_m):
                partial[m, tid] = acc[m]
            cuda.syncthreads()
            stride = threads // 2
            while stride > 0:
                if tid < stride:
                    for m in range(m_rows):
                        partial[m, tid] += partial[m, tid + stride]
                cuda.syncthreads()
                stride //= 2
            if tid < m_rows:
                y[tid, row] = partial[tid, 0]
            cuda.syncthreads()

    return os_kernel


def make_ws_kernel(tm: int = 128, tn: int = 32, tk: int = 32):
    """Weight-stationary kernel function for blocks of `tm` threads (one token each).

    tk % 4 == 0. Signature as `make_os_kernel`'s; any M (weights are read once per
    `tm` tokens).
    """
    tkw = tk // 4  # words per weight-tile row

    def ws_kernel(x, w_dev, w_host, n_dev, y):
        m_rows = x.shape[0]
        k_dim = x.shape[1]
        n_rows = y.shape[1]
        tid = cuda.threadIdx.x
        w_s = cuda.shared.array((tn, tk), float32)
        x_s = cuda.shared.array((tk, tm), float32)
        acc = cuda.local.array(tn, float32)
        num_tiles = (n_rows + tn - 1) // tn
        num_dev_tiles = (n_dev + tn - 1) // tn
        for t in range(cuda.blockIdx.x, num_tiles, cuda.gridDim.x):
            n0 = _tile_of(t, num_tiles, num_dev_tiles) * tn
            for m0 in range(0, m_rows, tm):
                for r in range(tn):
                    acc[r] = 0.0
                for k0 in range(0, k_dim, tk):
                    for i in range(tid, tn * tkw, tm):  # weight tile: words, widened once
                        r = i // tkw
                        kw = k0 // 4 + i % tkw
                        word = np.uint64(0)
                        if n0 + r < n_rows and 4 * kw < k_dim:
                            word = _load_word(w_dev, w_host, n_dev, n0 + r, kw)
                        for j in range(4):
                            w_s[r, 4 * (i % tkw) + j] = _unpack(word, j)
                    for i in range(tid, tk * tm, tm):  # x tile, transposed: x_s[k, m]
                        mm = m0 + i // tk
                        k = k0 + i % tk
                        v = float32(0.0)
                        if mm < m_rows and k < k_dim:
                            v = x[mm, k]
                        x_s[i % tk, i // tk] = v
                    cuda.syncthreads()
                    for kk in range(tk):
                        xv = x_s[kk, tid]
                        for r in range(tn):
                            acc[r] += w_s[r, kk] * xv
                    cuda.syncthreads()
                m = m0 + tid
                if m < m_rows:
                    for r in range(tn):
                        if n0 + r < n_rows:
                            y[m, n0 + r] = acc[r]

    return ws_kernel


# Production configurations. The simulator runs every CUDA thread as a Python thread,
# so under it the defaults are small blocks (same code, same tiling logic).
if IS_SIMULATOR:
    OS_CONFIG = {"threads": 8, "max_m": 4}
    WS_CONFIG = {"tm": 8, "tn": 4, "tk": 8}
else:
    OS_CONFIG = {"threads": 256, "max_m": 16}
    WS_CONFIG = {"tm": 128, "tn": 32, "tk": 32}
KERNEL_SIGNATURE = "void(float32[:, ::1], uint64[:, ::1], uint64[:, ::1], int64, float32[:, ::1])"

def make_gated_os_kernel(threads: int = 256, max_m: int = 16):
    """The output-stationary kernel behind a device-side switch: (active [1, E] f32,
    index, x, w_dev, w_host, n_dev, y) computes y only when active[0, index] != 0, so an
    expert no token was routed to reads none of its weights and the host never learns
    which experts were picked. Every thread of a block takes the same branch."""
    os_body = cuda.jit(device=True, inline=True)(make_os_kernel(threads, max_m))

    def gated_os_kernel(active, index, x, w_dev, w_host, n_dev, y):
        if active[0, index] != 0:
            os_body(x, w_dev, w_host, n_dev, y)

    return gated_os_kernel


_compiled: dict[tuple, object] = {}


def get_kernel(path: str, **config):
    """The jitted kernel for path "os" or "ws" with the given (or production) config."""
    key = (path, tuple(sorted(config.items())))
    if key not in _compiled:
        if path == "os":
            fn = make_os_kernel(**(config or OS_CONFIG))
        elif path == "os_gated":
            fn = make_gated_os_kernel(**(config or OS_CONFIG))
        elif path == "ws":
            fn = make_ws_kernel(**(config or WS_CONFIG))
        else:
            raise ValueError(f"unknown kernel path {path!r} (expected 'os' or 'ws')")
        _compiled[key] = cuda.jit(fn)
    return _compiled[key]


def block_threads(path: str, **config) -> int:
    cfg = config or (OS_CONFIG if path == "os" else WS_CONFIG)
    return cfg["threads"] if path == "os" else cfg["tm"]


def default_num_blocks(path: str, n_rows: int, **config) -> int:
    """Enough blocks to cover the rows (os) or row tiles (ws)."""
    if path == "os":
        return max(1, n_rows)
    tn = (config or WS_CONFIG)["tn"]
    return max(1, math.ceil(n_rows / tn))


def launch(path, x, w_dev, w_host, n_dev, y, num_blocks=None, stream=0, **config):
    """y = x @ W.T on the device. x, w_dev, w_host, y device (or mapped) arrays; weights
    as uint64 words (see `as_words`).

    `path` "os" requires M <= max_m (the caller chunks M); `num_blocks` caps the grid,
    which is how a MIG slice of fewer SMs is emulated. Raises ValueError on bad shapes.
    """
    if x.shape[1] % 4 or w_dev.shape[1] * 4 != x.shape[1] or w_host.shape[1] * 4 != x.shape[1]:
        raise ValueError("launch: x must be [M, K4] with K4 % 4 == 0 and weights [rows, K4/4]")
    if path == "os" and x.shape[0] > (config or OS_CONFIG)["max_m"]:
        raise ValueError(f"launch: the os path takes M <= {(config or OS_CONFIG)['max_m']}")
    kernel = get_kernel(path, **config)
    blocks = num_blocks or default_num_blocks(path, y.shape[1], **config)
    kernel[blocks, block_threads(path, **config), stream](x, w_dev, w_host, n_dev, y)


def launch_gated(active, index, x, w_dev, w_host, n_dev, y, num_blocks=None, stream=0):
    """`launch("os", ...)` that runs only when active[0, index] != 0 (a device value)."""
    if x.shape[0] > OS_CONFIG["max_m"]:
        raise ValueError(f"launch_gated: the os path takes M <= {OS_CONFIG['max_m']}")
    blocks = num_blocks or default_num_blocks("os", y.shape[1])
    get_kernel("os_gated")[blocks, OS_CONFIG["threads"], stream](active, index, x, w_dev, w_host, n_dev, y)


def as_words(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits [N, K] -> uint64 words [N, K4/4], K4 = K rounded up to 4.

    Zero-copy when K % 4 == 0 and the data is 8-byte aligned; otherwise a zero-padded
    copy (zero bits are +0.0 and add nothing). Pad x to K4 columns to match.
    """
    n_rows, k_dim = bits.shape
    k4 = (k_dim + 3) // 4 * 4
    if k4 != k_dim or bits.ctypes.data % 8 or not bits.flags.c_contiguous:
        padded = np.zeros((n_rows, k4), dtype=np.uint16)
        padded[:, :k_dim] = bits
        bits = padded
    return bits.view(np.uint64)
