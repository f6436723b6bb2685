"""CUDA HybridGEMM kernels and backend under the Numba CUDA simulator (no GPU needed).

The simulator is chosen by NUMBA_ENABLE_CUDASIM=1 when numba is first imported, so in a
normal test run `test_simulator_subprocess` re-runs this file in a fresh pytest process
with the variable set; the simulator cases below run (only) there. Sizes stay tiny
(dims <= 32): the simulator runs every CUDA thread as a Python thread.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim_only = pytest.mark.skipif(not IN_SIM, reason="runs inside test_simulator_subprocess")

RHOS = [0.0, 0.5, 1.0]
PATHS = ["os", "ws"]
SHAPES = [(1, 5, 7), (6, 20, 32), (9, 17, 11)]  # (M, N, K)


@pytest.mark.skipif(IN_SIM, reason="this is the simulator subprocess itself")
def test_simulator_subprocess(run_in_cuda_simulator):
    assert " passed" in run_in_cuda_simulator(__file__)


def bf16_bits(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return w, w.view(torch.uint16).numpy()


def assert_close(y, x, w_bits):
    from c2c_kernels.reference import linear_bits_ref

    ref = linear_bits_ref(x, w_bits)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * x.shape[1])


@sim_only
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_split_by_rho(shape, rho, path):
    from numba import cuda

    from c2c_kernels import cuda_kernels

    m, n, k = shape
    m = min(m, cuda_kernels.OS_CONFIG["max_m"]) if path == "os" else m
    _, bits = bf16_bits(n, k, seed=n * k)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    words = cuda_kernels.as_words(bits)  # [N, K4/4] uint64
    k4 = words.shape[1] * 4
    x4 = np.zeros((m, k4), np.float32)  # [M, K4]: zero columns meet zero weights
    x4[:, :k] = x
    n_dev = round(rho * n)
    dummy = np.zeros((1, k4 // 4), np.uint64)
    w_dev = cuda.to_device(words[:n_dev] if n_dev else dummy)
    w_host = cuda.to_device(words[n_dev:] if n_dev < n else dummy)  # "mapped" host part
    dy = cuda.device_array((m, n), np.float32)
    cuda_kernels.launch(path, cuda.to_device(x4), w_dev, w_host, n_dev, dy, num_blocks=3)
    assert_close(dy.copy_to_host(), x, bits)


@sim_only
def test_words_pad_odd_k_with_zeros():
    from c2c_kernels.cuda_kernels import as_words

    bits = np.arange(1, 16, dtype=np.uint16).reshape(3, 5)
    words = as_words(bits)
    assert words.dtype == np.uint64 and words.shape == (3, 2)
    back = words.view(np.uint16)
    assert (back[:, :5] == bits).all() and (back[:, 5:] == 0).all()
    even = np.arange(8, dtype=np.uint16).reshape(2, 4)
    assert np.shares_memory(as_words(even), even)  # zero-copy when K % 4 == 0


@sim_only
def test_tile_order_is_a_permutation_that_interleaves():
    from c2c_kernels.cuda_kernels import _tile_of

    for num_tiles, num_dev in [(10, 0), (10, 10), (10, 3), (7, 5), (1, 1)]:
        order = [_tile_of(t, num_tiles, num_dev) for t in range(num_tiles)]
        assert sorted(order) == list(range(num_tiles))
        first_half = order[: num_tiles // 2]
        num_dev_first = sum(1 for i in first_half if i < num_dev)
        assert abs(num_dev_first - num_dev * len(first_half) / num_tiles) <= 1


@sim_only
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rho", RHOS)
def test_hybrid_weight_through_kernels_linear(rho, path):
    import c2c_kernels as kernels
    from c2c_kernels.cuda_backend import DeviceTileCache, HybridWeight
    from c2c_kernels.reference import linear_ref

    w, _ = bf16_bits(19, 23, seed=7)  # odd K: the weight and x are zero-padded to 24
    hw = HybridWeight(w, name="layer.q_proj.weight")
    cache = DeviceTileCache(capacity_bytes=19 * 24 * 2)
    cache.register("m/q", hw)
    assert cache.set_rho(rho) == pytest.approx(np.floor(rho * 19) / 19)
    assert hw.choose_path(1) == "os" and hw.choose_path(kernels.decode_threshold() + 1) == "ws"
    hw.path = path
    hw.num_blocks = 2  # a "slice" of two blocks still covers every row
    g = torch.Generator().manual_seed(1)
    for m in [0, 1, 5]:  # 5 > the simulator's max_m: the os path chunks M
        x = torch.randn(m, 23, generator=g)
        bias = torch.randn(19, generator=g)
        y = kernels.linear(x, hw, bias)
        assert y.shape == (m, 19) and y.dtype == torch.float32
        assert torch.allclose(y.double(), linear_ref(x, w, bias), atol=1e-4)


@sim_only
def test_tile_cache_caps_rho_by_capacity():
    from c2c_kernels.cuda_backend import CudaWeightBackend

    backend = CudaWeightBackend(cache_bytes=0)
    g = torch.Generator().manual_seed(2)
    weights = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=g).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(8),
    }
    wrapped = backend.wrap_weights("tiny", weights)
    assert wrapped["model.embed_tokens.weight"] is weights["model.embed_tokens.weight"]
    assert wrapped["model.norm.weight"] is weights["model.norm.weight"]
    assert backend.set_rho(1.0) == 0.0  # no capacity: everything streams from host
    total = backend.cache.total_bytes
    assert backend.cache.set_capacity(total // 2) == pytest.approx(0.5)
    assert backend.cache.used_bytes <= total // 2
    assert backend.cache.set_capacity(total) == pytest.approx(1.0)
    assert backend.set_rho(0.25) == pytest.approx(0.25)
    backend.drop_model("tiny")
    assert backend.cache.total_bytes == 0
    with pytest.raises(ValueError, match="rho"):
        backend.set_rho(1.5)
