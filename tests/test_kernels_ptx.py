"""The CUDA HybridGEMM kernels compile to PTX for sm_90 (H100/GH200) without a GPU.

numba-cuda finds libNVVM in the nvidia-cuda-nvcc-cu12 wheel (`cuda.cudadrv.nvvm`), so
typing and lowering errors in the kernels surface in CI. Skipped only when NVVM cannot
be loaded at all, or when this process runs the simulator (which compiles nothing).
"""

from __future__ import annotations

import numba
import pytest

if numba.config.ENABLE_CUDASIM:
    pytest.skip(
        "NUMBA_ENABLE_CUDASIM=1: the simulator does not compile PTX", allow_module_level=True
    )


def _nvvm_or_skip():
    from numba.cuda.cudadrv import nvvm

    try:
        nvvm.NVVM()
    except Exception as exc:  # NvvmSupportError or a loader OSError: no toolkit here
        pytest.skip(f"libNVVM not found ({type(exc).__name__}: {exc}); install numba-cuda[cu12]")


@pytest.mark.parametrize("path", ["os", "ws", "os_gated"])
def test_kernel_compiles_to_sm90_ptx(path):
    _nvvm_or_skip()
    from numba import cuda

    from c2c_kernels import cuda_kernels

    signature = cuda_kernels.KERNEL_SIGNATURE
    if path == "os":
        fn = cuda_kernels.make_os_kernel(**cuda_kernels.OS_CONFIG)
    elif path == "ws":
        fn = cuda_kernels.make_ws_kernel(**cuda_kernels.WS_CONFIG)
    else:  # the MoE expert switch in front: (active [1, E] f32, index, ...)
        fn = cuda_kernels.make_gated_os_kernel(**cuda_kernels.OS_CONFIG)
        signature = signature.replace("void(", "void(float32[:, ::1], int64, ")
    ptx, _ = cuda.compile_ptx(fn, signature, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert ".entry" in ptx
    # fp32 FMAs on widened weights; accumulators stay in registers (no local memory).
    assert "fma.rn.f32" in ptx
    assert ".local" not in ptx
    if path == "ws":
        assert ".shared" in ptx and "bar.sync" in ptx


_F2, _F4 = "float32[:, ::1]", "float32[:, :, :, ::1]"
_I1, _W2 = "int32[::1]", "uint64[:, ::1]"
DEVICE_OP_SIGNATURES = {  # the argument types the device engine launches them with
    "embed": f"void({_I1}, {_W2}, {_W2}, int64, {_F2})",
    "add_rms_norm": f"void({_F2}, {_F2}, boolean, float32[::1], float32, {_F2})",
    "rope_kv_write": f"void({_F2}, {_I1}, {_I1}, {_F2}, {_F2}, int64, int64, {_F4}, {_F4}, int64)",
    "attention": f"void({_F2}, {_F4}, {_F4}, int64, {_I1}, {_I1}, int32[:, ::1], int64, int64, int64, float32, {_F2})",
    "silu_mul": f"void({_F2}, {_F2})",
    "add_bias": "void(float32[:, :], float32[::1])",  # a column range of q|k|v
    "fill": f"void({_F2}, float32)",
    "gather_rows": f"void({_F2}, {_I1}, {_F2})",
    "argmax": f"void({_F2}, {_I1})",
    "moe_route": f"void({_F2}, int64, boolean, {_F2}, {_F2})",
    "add_weighted": f"void({_F2}, {_F2}, {_F2}, int64)",
    "add_sigmoid_gated": f"void({_F2}, {_F2}, {_F2})",
}


@pytest.mark.parametrize("name", sorted(DEVICE_OP_SIGNATURES))
def test_device_op_compiles_to_sm90_ptx_without_spills(name):
    _nvvm_or_skip()
    from numba import cuda

    from c2c_kernels import cuda_ops

    if name == "attention":  # head_dim 128 on 64 threads
        fn = cuda_ops.make_attention(dims_per_thread=cuda_ops.attention_dims_per_thread(128))
    else:
        fn = cuda_ops.KERNELS[name]()
    ptx, _ = cuda.compile_ptx(fn, DEVICE_OP_SIGNATURES[name], cc=(9, 0))
    assert ".target sm_90" in ptx and ".entry" in ptx
    assert ".local" not in ptx  # no per-thread arrays spilled to local memory
    assert ".f64" not in ptx    # fp32 maths throughout: no stray double-precision conversions
