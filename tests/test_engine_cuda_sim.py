"""The engine's CUDA backend wiring, under the Numba CUDA simulator (no GPU needed).

A worker on a GPU slice builds its runner with device="cuda" (worker.device_runner): every
matrix of a model becomes a HybridWeight over the host-store mapping, the controller's ρ reaches the
slice's tile cache, and a projection computed through the (simulated) HybridGEMM equals
the CPU path. Whole generations run in tests/test_device_runner.py on smaller models.
"""

from __future__ import annotations

import os

import pytest
import torch

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.mark.skipif(IN_SIM, reason="this is the simulator subprocess itself")
def test_simulator_subprocess(run_in_cuda_simulator):
    assert "1 passed" in run_in_cuda_simulator(__file__)


@pytest.mark.skipif(not IN_SIM, reason="runs inside test_simulator_subprocess")
def test_cuda_runner_wraps_weights_and_follows_rho(tiny_model):
    import c2c_kernels as kernels
    from c2c_kernels.cuda_backend import HybridWeight
    from worker.engine import Engine, EngineConfig

    model_dir = tiny_model("llama", dtype="bfloat16")
    engine = Engine(EngineConfig(device="cuda", device_cache_bytes=1 << 20))
    engine.add_model("m", model_dir, preload=True)
    cache = engine.runner.weight_backend.cache
    hybrid = {n.split("/", 1)[1]: w for n, w in cache.weights.items()}   # registered per model
    assert all(isinstance(w, HybridWeight) for w in hybrid.values())
    assert any(n.endswith("down_proj.weight") for n in hybrid)
    assert not any("norm" in n for n in hybrid)
    assert "model.embed_tokens.weight" in hybrid  # rows gathered on the device (and a tied head)
    # fused q|k|v and gate|up are registered, their parts not: each byte cached once
    assert any(n.endswith("qkv_proj.weight") for n in hybrid)
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in hybrid)

    engine.set_control(rho=0.5)
    assert 0.4 < cache.used_bytes / cache.total_bytes <= 0.5
    # telemetry reports the achieved rho of the model, not a placeholder
    assert engine.stats().cached_fraction == {"m": pytest.approx(cache.used_bytes / cache.total_bytes)}

    name = next(n for n in hybrid if n.endswith("layers.0.self_attn.o_proj.weight"))
    x = torch.randn(2, hybrid[name].shape[1])                              # [M, K]
    host = engine.runner.slots["m"].resident.tensors()[name]               # bf16 [N, K]
    torch.testing.assert_close(kernels.linear(x, hybrid[name]), kernels.linear(x, host),
                               rtol=1e-4, atol=1e-4)

    engine.set_control(rho=0.0)
    assert cache.used_bytes == 0 and engine.stats().cached_fraction == {"m": 0.0}
    with pytest.raises(Exception, match="rho"):
        engine.set_control(rho=1.5)
