"""GGUF files: tensors vs the gguf package's reference dequantizer, config and tokenizer from
metadata, a .gguf path served like a checkpoint folder (engine, host store q4, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_quant_int8 import _logits

from bench.gguf_export import Q, gguf_arrays, gguf_name, write_gguf
from services.errors import CheckpointError
from worker.checkpoint import load_checkpoint, load_config
from worker.gguf_checkpoint import checkpoint_dir
from worker.gguf_tensors import dequantized, hf_name, open_gguf, unpermute_rope_rows
from worker.model import CausalLM
from worker.tokenizer import Tokenizer

MIXED = {"mlp": Q.Q4_0, "self_attn": Q.Q8_0, "embed": Q.F16, "lm_head": Q.Q4_1}


def _mixed(name: str):
    return next(qtype for part, qtype in MIXED.items() if part in name)


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("C2C_GGUF_CACHE", str(tmp_path / "gguf-cache"))
    monkeypatch.setenv("C2C_HOST_STORE", str(tmp_path / "store"))


def _reference(model_dir, qtype_of) -> dict[str, torch.Tensor]:
    """HF name -> what the file's tensors dequantize to by the package's reference, q/k rows
    of llama un-permuted."""
    config = load_config(model_dir)
    out = {}
    for name, (values, qtype) in gguf_arrays(model_dir, qtype_of).items():
        hf = hf_name(name)
        if hf is None:
            continue
        data = values if qtype == Q.F32 else gguf.quants.quantize(values, qtype)
        ref = gguf.quants.dequantize(data, qtype).reshape(values.shape)
        if config.arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            ref = unpermute_rope_rows(ref, config.num_heads if "q_proj" in hf else config.num_kv_heads)
        out[hf] = torch.from_numpy(np.ascontiguousarray(ref))
    return out


def test_rope_row_permutation_round_trips():
    from bench.gguf_export import permute_rope_rows

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_rope_rows(permute_rope_rows(w, 8), 8), w)
    assert not np.array_equal(permute_rope_rows(w, 8), w)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tensors_config_and_tokenizer_come_back(tiny_model, tmp_path, arch):
    model_dir = tiny_model(arch)
    folder = checkpoint_dir(write_gguf(model_dir, tmp_path / f"{arch}.gguf", _mixed))
    config, tensors = load_checkpoint(folder)
    original = load_config(model_dir)
    assert config.dtype == "float32" and folder.name == arch
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "rms_norm_eps", "rope_theta", "rope_scaling", "vocab_size", "tie_word_embeddings",
                  "attention_bias", "max_position_embeddings", "bos_token_id"):
        assert getattr(config, field) == getattr(original, field), field
    reference = _reference(model_dir, _mixed)
    assert set(tensors) == set(reference)
    for name, values in reference.items():
        assert torch.equal(tensors[name], values), name
    ours, theirs = Tokenizer(folder), Tokenizer(model_dir)
    for text in ("Hello, world!  It's 2024 -- numbers 12345.", "\n\ttabs and ünïcödé"):
        assert ours.encode(text) == theirs.encode(text)
    messages = [{"role": "user", "content": "hi there"}]
    assert ours.encode_chat(messages) == theirs.encode_chat(messages)
    assert set(theirs.eos_token_ids) <= set(ours.eos_token_ids)


def test_k_quants_dequantize_like_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    raw = {}
    for name, qtype, scale_at in (("blk.0.ffn_down.weight", Q.Q4_K, (0, 2)), ("blk.0.ffn_up.weight", Q.Q6_K, (208,))):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (6, 512 // block * size), dtype=np.uint8)  # 6 rows of 512
        blocks = data.reshape(-1, size)
        for at in scale_at:  # finite fp16 super-block scales
            blocks[:, at:at + 2] = rng.uniform(-0.1, 0.1, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
        writer.add_tensor(name, data, raw_dtype=qtype)
        raw[name] = (data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in open_gguf(tmp_path / "k.gguf").tensors:
        data, qtype = raw[tensor.name]
        ours = dequantized(tensor)
        assert ours.shape == (6, 512) and np.isfinite(ours).all()
        assert np.array_equal(ours, gguf.quants.dequantize(data, qtype))


def test_a_gguf_file_serves_like_its_float_model(tiny_model, tmp_path):
    from worker.engine import Engine, EngineConfig, SamplingParams

    model_dir = tiny_model("llama")
    path = write_gguf(model_dir, tmp_path / "llama.gguf", _mixed)
    engine = Engine(EngineConfig(block_size=4, kv_cache_bytes=1 << 20, num_threads=1, quantize=""))
    engine.add_model("m", path)
    prompt = list(range(1, 30))
    out = engine.generate("m", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    config, weights = load_checkpoint(model_dir)
    ref = _logits(CausalLM(config, {**weights, **_reference(model_dir, _mixed)}), prompt + out.new_token_ids[:3])
    assert out.new_token_ids == ref.argmax(-1).tolist()


def test_q4_0_tensors_come_back_bit_for_bit_under_quantize_q4(tiny_model, tmp_path):
    from worker.hoststore import HostStore

    model_dir = tiny_model("qwen2")  # no q/k permutation: the file's rows are the store's rows
    path = write_gguf(model_dir, tmp_path / "qwen2.gguf", lambda name: Q.Q4_0)
    store = HostStore(tmp_path / "q4-store")
    with store.open(store.make_resident(checkpoint_dir(path), quantize="q4")) as resident:
        tensors = resident.tensors()
        num_checked = 0
        for tensor in open_gguf(path).tensors:
            name = hf_name(tensor.name)
            if tensor.tensor_type != Q.Q4_0 or tensors[name].dtype != torch.uint8:  # the embedding stays float
                continue
            num_checked += 1
            blocks = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, 18)  # [N, K/32, 2 + 16]
            assert np.array_equal(tensors[name].numpy(), blocks[..., 2:].reshape(blocks.shape[0], -1)), name
            assert np.array_equal(tensors[name + "_scale"].view(torch.uint8).numpy(),
                                  blocks[..., :2].reshape(blocks.shape[0], -1)), name
        config = load_config(model_dir)
        assert num_checked == (not config.tie_word_embeddings) + 7 * config.num_layers  # head, q k v o gate up down


def test_bf16_files_stay_bf16(tiny_model, tmp_path):
    folder = checkpoint_dir(write_gguf(tiny_model("qwen2"), tmp_path / "b.gguf", lambda name: Q.BF16))
    assert load_config(folder).dtype == "bfloat16"


def test_generate_and_models_gguf_commands(tiny_model, tmp_path, capsys):
    from services.cli import main

    path = write_gguf(tiny_model("llama"), tmp_path / "cli.gguf", _mixed)
    assert main(["models", "gguf", str(path)]) == 0
    folder = capsys.readouterr().out.strip()
    assert (tmp_path / "gguf-cache") in Path(folder).parents
    code = main(["generate", "--model", str(path), "--prompt", "hello", "--max-tokens", "3", "--ignore-eos",
                 "--quantize", "q4", "--threads", "1", "--json"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) == 3


def test_unsupported_files_are_refused_by_name(tiny_model, tmp_path):
    spm = write_gguf(tiny_model("llama"), tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
        checkpoint_dir(spm)
    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(bare), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="embedding_length"):
        checkpoint_dir(bare)
    assert gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias" and hf_name("x.weight") is None


def test_up_converts_a_gguf_models_argument_in_a_child_process(tiny_model, tmp_path):
    from services.launcher import gguf_folder

    path = write_gguf(tiny_model("qwen2"), tmp_path / "up.gguf", _mixed)
    folder = gguf_folder(path)
    assert (folder / "config.json").is_file() and folder == checkpoint_dir(path)  # converted once, found again
