"""int8 per-channel weights: quantizer, kernels vs float64, host store copies; model logits and the
engine for int8 and q4 (tests/test_quant_q4.py has q4's own kernel and store tests)."""

from __future__ import annotations

import pytest
import torch

import c2c_kernels as kernels
from c2c_kernels import serial_or_threaded
from c2c_kernels.cpu_int8 import dequantize_int8, quantize_int8
from c2c_kernels.cpu_q4 import HAS_VNNI, can_quantize_q4, dequantize_q4, quantize_q4
from worker.checkpoint import load_checkpoint
from worker.forward_batch import ForwardBatch
from worker.hoststore import HostStore
from worker.layers import (
    EMBED,
    LM_HEAD,
    QUANTIZED_SUFFIXES,
    quantize_weights,
    with_quantized_weights,
)
from worker.model import CausalLM, KVCache


def test_quantize_int8_rounds_each_row_to_its_own_scale():
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]
    w[5] = 0.0  # an all-zero row keeps scale 1 and q 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (37,) and int(q.abs().max()) <= 127
    assert float(scale[5]) == 1.0 and not q[5].any()
    assert bool(((dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-12).all())


@pytest.mark.parametrize("way", ["serial", "threaded"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("k", [301, 256])  # 301: the fp32 kernel; 256: the VNNI kernel where the CPU has it
def test_int8_linear_matches_float64_on_the_dequantized_weights(m, k, way, monkeypatch):
    from c2c_kernels import cpu_int8
    from c2c_kernels.cpu_vnni import dequantize_activations

    monkeypatch.setattr(kernels, "SERIAL_MAX_BYTES", 0)
    monkeypatch.setattr(kernels, "SKINNY_SERIAL_MAX_BYTES", 1 << 40 if way == "serial" else 0)
    monkeypatch.setattr(serial_or_threaded, "FORCED", way)
    g = torch.Generator().manual_seed(m + k)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(203, k, generator=g), torch.randn(203, generator=g)
    weight = kernels.Int8Weight(*quantize_int8(w))
    y = kernels.linear(x, weight, bias)
    deq = dequantize_int8(weight.q, weight.scale).to(torch.float64)
    is_int8_x = m <= kernels.decode_threshold() and cpu_int8.uses_vnni(m, k)
    x_seen = dequantize_activations(x) if is_int8_x else x  # the VNNI path's int8 activations
    ref = x_seen.to(torch.float64) @ deq.T + bias
    bound = x_seen.abs().to(torch.float64) @ deq.abs().T
    assert y.dtype == torch.float32 and y.shape == (m, 203)
    assert bool(((y - ref).abs() <= 4 * k**0.5 * 2.0**-23 * bound + 1e-6).all())


def test_int8_prefill_dequantizes_block_by_block():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 3000, generator=g), torch.randn(700, 3000, generator=g)  # blocks of 87 rows
    weight = kernels.Int8Weight(*quantize_int8(w))
    deq = dequantize_int8(weight.q, weight.scale).to(torch.float64)
    ref = x.to(torch.float64) @ deq.T
    bound = x.abs().to(torch.float64) @ deq.abs().T
    assert bool(((kernels.linear(x, weight) - ref).abs() <= 4 * 3000**0.5 * 2.0**-23 * bound + 1e-6).all())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return HostStore(tmp_path_factory.mktemp("int8store"))


@pytest.fixture(scope="module")
def tied_qwen2(tmp_path_factory):
    from worker.synth import synth_model

    return synth_model("qwen2", "small", tmp_path_factory.mktemp("qwen2-small"))  # bf16, tied


def test_host_store_keeps_an_int8_copy_with_fused_views(tied_qwen2, store):
    model_dir = tied_qwen2  # tied embeddings, q|k|v bias
    plain, quant = store.make_resident(model_dir), store.make_resident(model_dir, quantize="int8")
    assert quant == plain + "-int8"
    sizes = dict(store.resident_models())
    assert sizes[quant] < sizes[plain]
    with store.open(quant) as resident:
        tensors = resident.tensors()
        _, original = load_checkpoint(model_dir)
        a = "model.layers.1.self_attn"
        parts = [f"{a}.{p}_proj.weight" for p in "qkv"]
        assert tensors[f"{a}.qkv_proj.weight"].dtype == torch.int8
        assert torch.equal(tensors[f"{a}.qkv_proj.weight"], torch.cat([tensors[p] for p in parts]))
        assert torch.equal(tensors[f"{a}.qkv_proj.weight_scale"], torch.cat([tensors[p + "_scale"] for p in parts]))
        for name in parts + [f"{a}.o_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
            q, scale = quantize_int8(original[name])
            assert torch.equal(tensors[name], q) and torch.equal(tensors[name + "_scale"], scale)
        assert tensors[EMBED].dtype == torch.bfloat16 and tensors[f"{a}.qkv_proj.bias"].dtype == torch.bfloat16
        assert torch.equal(tensors[LM_HEAD], quantize_int8(original[EMBED])[0])  # the tied head's own copy


def _reference_weights(model_dir, mode: str = "int8") -> dict:
    """The checkpoint with every quantized matrix replaced by its dequantized fp32 values."""
    config, weights = load_checkpoint(model_dir)
    weights = dict(weights)
    if config.tie_word_embeddings:
        weights[LM_HEAD] = weights[EMBED]
    for name, t in list(weights.items()):
        if t.dim() == 2 and name.endswith(QUANTIZED_SUFFIXES):
            if mode == "int8":
                weights[name] = dequantize_int8(*quantize_int8(t))
            elif can_quantize_q4(t.shape):
                weights[name] = dequantize_q4(*quantize_q4(t))
    return config, weights


def _logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Prefill all but the last 3 tokens, then decode them one by one: [4, V] logits."""
    kv = KVCache.allocate(model.config, 16, 4)
    table = list(range(16))
    rows = [model.forward(ForwardBatch.build([ids[:-3]], [0], [table], 4), kv)]
    for i in range(len(ids) - 3, len(ids)):
        rows.append(model.forward(ForwardBatch.build([[ids[i]]], [i], [table], 4), kv))
    return torch.cat(rows)


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, mode: str) -> None:
    """Equal to fp32 rounding, except where the decode path rounds the activations to int8
    per group of 32 (VNNI, as llama.cpp's Q4_0/Q8_0 x Q8_0): there within 3% in relative
    norm (measured 0.3-1.4% on these tiny random models)."""
    if HAS_VNNI:
        assert float((ours - ref).norm() / ref.norm()) < 3e-2
    else:
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "q4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2-tied", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("residency", ["host", "load"])
def test_quantized_model_logits_match_a_float_model_on_dequantized_weights(tiny_model, tied_qwen2, store, arch,
                                                                           residency, mode):
    model_dir = tied_qwen2 if arch == "qwen2-tied" else tiny_model(arch, dtype="bfloat16")
    config, ref_weights = _reference_weights(model_dir, mode)
    if residency == "host":
        resident = store.open(store.make_resident(model_dir, quantize=mode))
        weights = with_quantized_weights(resident.tensors())
    else:
        weights = quantize_weights(load_checkpoint(model_dir)[1], mode)
    model = CausalLM(config, weights)
    assert isinstance(model.lm_head, kernels.Int8Weight if mode == "int8" else kernels.Q4Weight)
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    ours, ref = _logits(model, ids), _logits(CausalLM(config, ref_weights), ids)
    _assert_logits_close(ours, ref, mode)


@pytest.mark.parametrize("mode", ["int8", "q4"])
def test_engine_serves_quantized_weights_from_the_host_store(tiny_model, tmp_path, monkeypatch, mode):
    from worker.engine import Engine, EngineConfig, SamplingParams

    monkeypatch.setenv("C2C_QUANTIZE", "int8")  # q4: EngineConfig.quantize wins over the environment
    model_dir = tiny_model("llama", dtype="bfloat16")
    engine = Engine(EngineConfig(residency="host", host_store_root=str(tmp_path), block_size=4,
                                 kv_cache_bytes=1 << 20, num_threads=1, quantize=None if mode == "int8" else mode))
    engine.add_model("m", model_dir)
    out = engine.generate("m", list(range(1, 30)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    slot = engine.runner.slots["m"]
    assert slot.host_key.endswith(f"-{mode}") and len(out.new_token_ids) == 6
    assert isinstance(slot.model.layers[0].mlp.down, kernels.Int8Weight if mode == "int8" else kernels.Q4Weight)
    config, ref_weights = _reference_weights(model_dir, mode)
    ref = _logits(CausalLM(config, ref_weights), list(range(1, 30)) + out.new_token_ids[:3])
    assert out.new_token_ids[:4] == ref.argmax(-1).tolist()  # prompt's next token, then 3 decoded
