"""CPU HybridGEMM (`kernels.linear` and friends) against float64 references."""

from __future__ import annotations

import json

import pytest
import torch

import c2c_kernels as kernels
from c2c_kernels import cpu_gemm, serial_or_threaded
from c2c_kernels.membw import measure_read_gbps
from c2c_kernels.reference import linear_ref, moe_ref
from services.errors import InvalidRequest

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M, N, K): odd sizes, M on both sides of the decode threshold, N not a multiple of 4.
SHAPES = [(1, 1, 1), (1, 7, 13), (2, 33, 17), (3, 5, 9), (4, 8, 64), (5, 63, 31),
          (16, 17, 100), (17, 9, 33), (33, 70, 129), (100, 130, 70)]  # fmt: skip


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
    """fp32 accumulation error bound: a few ulps of sum_k |x_k w_k| per output."""
    ref = linear_ref(x, w, bias)
    bound = x.abs().to(torch.float64) @ w.abs().to(torch.float64).T  # [M, N]
    tol = 4 * x.shape[-1] ** 0.5 * 2.0**-23 * bound + 1e-6
    assert y.dtype == torch.float32
    assert y.shape == ref.shape
    assert bool(((y.to(torch.float64) - ref).abs() <= tol).all()), (y - ref).abs().max()


def make(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    return x, w, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_float64(shape, dtype):
    x, w, bias = make(*shape, dtype)
    assert_close(kernels.linear(x, w), x, w)
    assert_close(kernels.linear(x, w, bias), x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_empty_batch(dtype):
    x, w, bias = make(0, 12, 8, dtype)
    y = kernels.linear(x, w, bias)
    assert y.shape == (0, 12) and y.dtype == torch.float32


@pytest.mark.parametrize("m", [2, 3, 5, 6, 7, 9, 14, 15])
@pytest.mark.parametrize("n", [5, 8, 13])
def test_skinny_batches_of_every_tail_size(m, n, monkeypatch):
    # 1-3 rows past the last 4-row group take the 2x4 / 1x4 blocks, not zero padding;
    # N % 4 != 0 leaves weight rows for the 4x1 block and the scalar tail
    x, w, bias = make(m, n, 37, torch.bfloat16, seed=m * n)
    assert_close(kernels.linear(x, w, bias), x, w, bias)           # serial (small)
    monkeypatch.setattr(kernels, "SERIAL_MAX_BYTES", 0)
    monkeypatch.setattr(kernels, "SKINNY_SERIAL_MAX_BYTES", 0)
    monkeypatch.setattr(serial_or_threaded, "FORCED", "threaded")
    assert_close(kernels.linear(x, w, bias), x, w, bias)           # threaded


@pytest.mark.parametrize("m", [1, 3, 8])
def test_parallel_decode_path_on_a_large_matrix(m, monkeypatch):
    # 601 x 520 bf16 = 625 KB: above the lowered SERIAL_MAX_BYTES, so the threaded kernels
    # run (an odd row count: the last task's range is short).
    monkeypatch.setattr(kernels, "SERIAL_MAX_BYTES", 512 * 1024)
    x, w, bias = make(m, 601, 520, torch.bfloat16, seed=m)
    assert w.numel() * 2 > kernels.SERIAL_MAX_BYTES
    for way in ("threaded", "serial", None):  # None: the measured choice (M = 1)
        monkeypatch.setattr(serial_or_threaded, "FORCED", way)
        monkeypatch.setattr(kernels, "SKINNY_SERIAL_MAX_BYTES", 1 << 40 if way == "serial" else 0)
        assert_close(kernels.linear(x, w, bias), x, w, bias)


def test_serial_or_threaded_runs_the_faster_way_and_retries_the_other(monkeypatch):
    ways = serial_or_threaded.SerialOrThreaded()
    monkeypatch.setattr(serial_or_threaded, "FORCED", None)
    seen = []
    for _ in range(4):  # two samples of each way first, threaded first
        key, is_serial = ways.choose(1 << 20)
        seen.append(is_serial)
        ways.record(key, is_serial, 1e-3 if is_serial else 3e-3, 1 << 20)  # serial 3x faster
    assert seen == [False, True, False, True]
    assert [ways.choose(1 << 20)[1] for _ in range(5)] == [True] * 5
    monkeypatch.setattr(serial_or_threaded, "EXPLORE_EVERY_S", 0.0)
    assert ways.choose(1 << 20)[1] is False  # the slower way, retried once in a while


@pytest.mark.parametrize("candidate", sorted(cpu_gemm.CANDIDATES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_prefill_candidate(candidate, dtype, monkeypatch):
    monkeypatch.setenv("C2C_PREFILL_KERNEL", candidate)
    for m, n, k in [(17, 9, 33), (130, 261, 600), (64, 4, 4)]:
        x, w, bias = make(m, n, k, dtype, seed=m)
        assert_close(kernels.linear(x, w, bias), x, w, bias)


def test_autotune_remembers_a_choice_per_shape(monkeypatch):
    monkeypatch.delenv("C2C_PREFILL_KERNEL", raising=False)
    x, w, _ = make(40, 24, 48, torch.bfloat16)
    assert_close(kernels.linear(x, w), x, w)
    key = (64, 24, 48, "torch.bfloat16")
    assert cpu_gemm.chosen_kernels()[key] in cpu_gemm.CANDIDATES


def test_autotune_decisions_persist_for_a_fresh_process(monkeypatch, tmp_path):
    monkeypatch.delenv("C2C_PREFILL_KERNEL", raising=False)
    monkeypatch.setenv("C2C_AUTOTUNE_FILE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(cpu_gemm, "_choice", {})
    x, w, _ = make(70, 28, 52, torch.bfloat16)
    assert_close(kernels.linear(x, w), x, w)               # times the candidates, saves
    chosen = cpu_gemm.chosen_kernels()[(128, 28, 52, "torch.bfloat16")]
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert [v for k, v in saved.items() if k.endswith("|128|28|52|torch.bfloat16")] == [chosen]

    def no_timing(*args):
        raise AssertionError("a saved decision must not be timed again")

    monkeypatch.setattr(cpu_gemm, "_choice", {})             # as in a new worker process
    monkeypatch.setattr(cpu_gemm, "_loaded_from", None)
    monkeypatch.setattr(cpu_gemm, "_autotune", no_timing)
    assert_close(kernels.linear(x, w), x, w)
    assert cpu_gemm.chosen_kernels()[(128, 28, 52, "torch.bfloat16")] == chosen


def test_a_corrupt_autotune_file_only_means_retuning(monkeypatch, tmp_path):
    monkeypatch.delenv("C2C_PREFILL_KERNEL", raising=False)
    (tmp_path / "tune.json").write_text("{not json")
    monkeypatch.setenv("C2C_AUTOTUNE_FILE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(cpu_gemm, "_choice", {})
    monkeypatch.setattr(cpu_gemm, "_loaded_from", None)
    x, w, _ = make(33, 20, 44, torch.bfloat16)
    assert_close(kernels.linear(x, w), x, w)
    assert json.loads((tmp_path / "tune.json").read_text())  # rewritten, valid


def test_unknown_prefill_kernel_is_a_named_error(monkeypatch):
    monkeypatch.setenv("C2C_PREFILL_KERNEL", "nope")
    x, w, _ = make(40, 8, 8, torch.bfloat16)
    with pytest.raises(InvalidRequest, match="C2C_PREFILL_KERNEL"):
        kernels.linear(x, w)


def test_decode_threshold_moves_the_path_not_the_result():
    x, w, bias = make(8, 40, 56, torch.bfloat16)
    try:
        kernels.set_decode_threshold(0)  # everything is "prefill"
        y_prefill = kernels.linear(x, w, bias)
        kernels.set_decode_threshold(64)
        y_decode = kernels.linear(x, w, bias)
    finally:
        kernels.set_decode_threshold(16)
    assert_close(y_prefill, x, w, bias)
    assert_close(y_decode, x, w, bias)


def test_strided_and_batched_inputs():
    x, w, bias = make(6, 20, 24, torch.bfloat16)
    x_t = x.T.contiguous().T  # same values, column-major strides
    assert not x_t.is_contiguous()
    assert_close(kernels.linear(x_t, w, bias), x, w, bias)
    w_t = w.T.contiguous().T  # a non-contiguous weight view is copied, not misread
    assert_close(kernels.linear(x, w_t, bias), x, w, bias)
    y3 = kernels.linear(x.reshape(2, 3, 24), w)  # leading dims are kept
    assert y3.shape == (2, 3, 20)
    assert_close(y3.reshape(6, 20), x, w)
    assert_close(kernels.linear(x.to(torch.bfloat16), w), x.to(torch.bfloat16).float(), w)


def test_k_mismatch_raises():
    x, w, _ = make(2, 4, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="K=8"):
        kernels.linear(x, w[:, :6])


def test_moe_reads_selected_experts_and_matches_reference():
    g = torch.Generator().manual_seed(3)
    num_experts, t, n, k = 6, 9, 20, 28
    expert_ws = [torch.randn(n, k, generator=g).to(torch.bfloat16) for _ in range(num_experts)]
    x = torch.randn(t, k, generator=g)
    topk_ids = torch.randint(0, 4, (t, 2), generator=g)  # experts 4, 5 never selected
    topk_weights = torch.rand(t, 2, generator=g)
    groups = kernels.group_by_expert(topk_ids)
    assert [e for e, _, _ in groups] == sorted(set(topk_ids.flatten().tolist()))
    assert sum(len(tok) for _, tok, _ in groups) == t * 2
    y = kernels.moe_linear(x, expert_ws, topk_ids, topk_weights)
    ref = moe_ref(x, expert_ws, topk_ids, topk_weights)
    assert torch.allclose(y.to(torch.float64), ref, atol=1e-4)


def test_grouped_linear():
    xs = [torch.randn(3, 16), torch.randn(1, 16)]
    ws = [torch.randn(5, 16).to(torch.bfloat16), torch.randn(7, 16).to(torch.bfloat16)]
    for y, x, w in zip(kernels.grouped_linear(xs, ws), xs, ws, strict=True):
        assert_close(y, x, w)


def test_memory_bandwidth_probe_is_positive():
    assert measure_read_gbps(num_bytes=16 << 20, repeats=2) > 0.1


def test_concurrent_calls_from_threads_are_safe():
    # Numba's workqueue layer aborts the process on concurrent entry; linear serializes.
    from concurrent.futures import ThreadPoolExecutor

    x, w, bias = make(3, 600, 520, torch.bfloat16, seed=11)
    x_big, _, _ = make(40, 600, 520, torch.bfloat16, seed=11)
    with ThreadPoolExecutor(max_workers=4) as pool:
        ys = list(pool.map(lambda i: kernels.linear(x if i % 2 else x_big, w, bias), range(12)))
    for i, y in enumerate(ys):
        assert_close(y, x if i % 2 else x_big, w, bias)


def test_bench_kernels_row_runs_and_renders():
    from bench.kernels import bench_shape, format_row

    row = bench_shape("tiny", "proj", 12, 20, 3, repeats=1)
    assert row["path"] == "decode" and row["ours_us"] > 0 and row["speedup_vs_bf16"] > 0
    assert "GB/s" in format_row(row, roofline_gbps=10.0)
    row = bench_shape("tiny", "proj", 12, 20, 40, repeats=1)
    assert row["path"] == "prefill" and "GF/s" in format_row(row, roofline_gbps=10.0)


def test_bf16_prefill_math_rounds_activations_and_accumulates_in_fp32(monkeypatch):
    monkeypatch.setenv("C2C_PREFILL_MATH", "bf16")
    monkeypatch.delenv("C2C_PREFILL_KERNEL", raising=False)
    x, w, bias = make(40, 33, 300, torch.bfloat16)
    y = kernels.linear(x, w, bias)
    assert y.dtype == torch.float32
    expected = torch.nn.functional.linear(x.to(torch.bfloat16), w).float() + bias
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    ref = linear_ref(x, w, bias)
    bound = x.abs().to(torch.float64) @ w.abs().to(torch.float64).T  # [M, N]
    assert bool(((y.to(torch.float64) - ref).abs() <= 2.0**-7 * bound + 1e-6).all())  # bf16 x and y


def test_bf16_prefill_math_keeps_fp16_weights_exact(monkeypatch):
    monkeypatch.setenv("C2C_PREFILL_MATH", "bf16")
    monkeypatch.delenv("C2C_PREFILL_KERNEL", raising=False)
    x, w, bias = make(40, 33, 70, torch.float16)
    assert_close(kernels.linear(x, w, bias), x, w, bias)


def test_exact_prefill_math_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_has_amx", True)
    monkeypatch.setenv("C2C_PREFILL_MATH", "auto")
    assert cpu_gemm.prefill_math() == "bf16"
    monkeypatch.setenv("C2C_PREFILL_MATH", "exact")
    assert cpu_gemm.prefill_math() == "exact"
    x, w, bias = make(40, 33, 70, torch.bfloat16)
    assert_close(kernels.linear(x, w, bias), x, w, bias)
    monkeypatch.setattr(cpu_gemm, "_has_amx", False)
    monkeypatch.setenv("C2C_PREFILL_MATH", "auto")
    assert cpu_gemm.prefill_math() == "exact"


def test_unknown_prefill_math_is_a_named_error(monkeypatch):
    monkeypatch.setenv("C2C_PREFILL_MATH", "fp8")
    monkeypatch.delenv("C2C_PREFILL_KERNEL", raising=False)
    x, w, _ = make(40, 8, 8, torch.bfloat16)
    with pytest.raises(InvalidRequest, match="C2C_PREFILL_MATH"):
        kernels.linear(x, w)
