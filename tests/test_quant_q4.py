"""q4 weights (4-bit groups of 32, GGUF Q4_0 numbers): quantizer vs the gguf package, kernels vs
float64, host store copies, the generate command. Model logits and the engine: test_quant_int8.py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import c2c_kernels as kernels
from c2c_kernels import cpu_q4, serial_or_threaded
from c2c_kernels.cpu_q4 import dequantize_q4, quantize_q4
from c2c_kernels.cpu_vnni import dequantize_activations
from worker.checkpoint import load_checkpoint
from worker.hoststore import HostStore
from worker.layers import EMBED, LM_HEAD


def test_quantize_q4_is_gguf_q4_0_bit_for_bit():
    w = torch.randn(37, 96) * torch.logspace(-3, 1, 37)[:, None]
    w[5] = 0.0  # an all-zero group: d 0, every nibble 8
    qs, scale = quantize_q4(w)
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(37, 3, 18)
    assert qs.dtype == torch.uint8 and qs.shape == (37, 48) and scale.dtype == torch.float16 and scale.shape == (37, 3)
    assert np.array_equal(blocks[..., 2:].reshape(37, 48), qs.numpy())
    assert np.array_equal(blocks[..., :2].copy().view(np.float16)[..., 0], scale.numpy())
    reference = gguf.quants.dequantize(blocks.reshape(37, -1), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(reference, dequantize_q4(qs, scale).numpy())
    assert float(dequantize_q4(qs, scale)[5].abs().max()) == 0.0


def test_quantize_q4_refuses_a_width_off_the_group():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4(torch.randn(4, 40))


def _bound(x: torch.Tensor, deq: torch.Tensor, k: int) -> torch.Tensor:
    return 4 * k**0.5 * 2.0**-23 * (x.abs().to(torch.float64) @ deq.abs().T) + 1e-6


@pytest.mark.parametrize("way", ["serial", "threaded"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("k", [96, 256])  # 96: the fp32 kernel; 256: the VNNI kernel where the CPU has it
def test_q4_linear_matches_float64(m, k, way, monkeypatch):
    monkeypatch.setattr(kernels, "SERIAL_MAX_BYTES", 0)
    monkeypatch.setattr(kernels, "SKINNY_SERIAL_MAX_BYTES", 1 << 40 if way == "serial" else 0)
    monkeypatch.setattr(serial_or_threaded, "FORCED", way)
    g = torch.Generator().manual_seed(m + k)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(203, k, generator=g), torch.randn(203, generator=g)
    weight = kernels.Q4Weight(*quantize_q4(w))
    assert weight.shape == (203, k)
    y = kernels.linear(x, weight, bias)
    deq = dequantize_q4(weight.qs, weight.scale).to(torch.float64)
    is_int8_x = m <= kernels.decode_threshold() and cpu_q4.can_use_vnni(k)
    x_seen = dequantize_activations(x) if is_int8_x else x  # the VNNI path's int8 activations
    ref = x_seen.to(torch.float64) @ deq.T + bias
    assert y.dtype == torch.float32 and y.shape == (m, 203)
    assert bool(((y - ref).abs() <= _bound(x_seen, deq, k)).all())


@pytest.mark.skipif(not cpu_q4.HAS_VNNI, reason="this CPU has no AVX512-VNNI")
def test_vnni_activations_round_each_group_to_int8():
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 256)
    xq = dequantize_activations(x)
    step = x.view(2, 8, 32).abs().amax(-1, keepdim=True) / 127  # [2, 8, 1]
    # half a step, plus x * (1 / dx)'s own rounding (fastmath multiplies by the inverse)
    assert bool(((xq - x).view(2, 8, 32).abs() <= step * (0.5 + 1e-4)).all())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return HostStore(tmp_path_factory.mktemp("q4store"))


def test_host_store_keeps_a_q4_copy_with_fused_views(tmp_path_factory, store):
    from worker.synth import synth_model

    model_dir = synth_model("qwen2", "small", tmp_path_factory.mktemp("qwen2-small"))  # bf16, tied, q|k|v bias
    plain, quant = store.make_resident(model_dir), store.make_resident(model_dir, quantize="q4")
    assert quant == plain + "-q4"
    sizes = dict(store.resident_models())
    assert sizes[quant] < sizes[plain]
    with store.open(quant) as resident:
        tensors = resident.tensors()
        _, original = load_checkpoint(model_dir)
        a = "model.layers.1.self_attn"
        parts = [f"{a}.{p}_proj.weight" for p in "qkv"]
        fused = tensors[f"{a}.qkv_proj.weight"]
        assert fused.dtype == torch.uint8 and torch.equal(fused, torch.cat([tensors[p] for p in parts]))
        assert torch.equal(tensors[f"{a}.qkv_proj.weight_scale"], torch.cat([tensors[p + "_scale"] for p in parts]))
        for name in parts + [f"{a}.o_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
            qs, scale = quantize_q4(original[name])
            assert torch.equal(tensors[name], qs) and torch.equal(tensors[name + "_scale"], scale)
        assert tensors[EMBED].dtype == torch.bfloat16
        assert torch.equal(tensors[LM_HEAD], quantize_q4(original[EMBED])[0])  # the tied head's own copy


def test_generate_command_with_q4_weights(tiny_model, tmp_path, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("C2C_HOST_STORE", str(tmp_path))
    model_dir = tiny_model("llama", dtype="bfloat16")
    code = main(["generate", "--model", str(model_dir), "--prompt", "hello there", "--max-tokens", "5",
                 "--ignore-eos", "--quantize", "q4", "--threads", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and len(result["token_ids"]) == 5 and result["finish_reason"] == "length"
    assert any(path.name.endswith("-q4") for path in (tmp_path / "models").iterdir())
