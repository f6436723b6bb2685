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


@pytest.mark.parametrize("path", ["os", "ws"])
def test_kernel_compiles_to_sm90_ptx(path):
    _nvvm_or_skip()
    from numba import cuda

    from c2c_kernels import cuda_kernels

    if path == "os":
        fn = cuda_kernels.make_os_kernel(**cuda_kernels.OS_CONFIG)
    else:
        fn = cuda_kernels.make_ws_kernel(**cuda_kernels.WS_CONFIG)
    ptx, _ = cuda.compile_ptx(fn, cuda_kernels.KERNEL_SIGNATURE, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert ".entry" in ptx
    # fp32 FMAs on widened weights; accumulators stay in registers (no local memory).
    assert "fma.rn.f32" in ptx
    assert ".local" not in ptx
    if path == "ws":
        assert ".shared" in ptx and "bar.sync" in ptx
