"""Checkpoint folders: config parsing for every family, and one-line errors for broken ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from services.errors import CheckpointError
from worker.checkpoint import (
    ARCHITECTURES,
    checkpoint_tensor_files,
    index_checkpoint,
    load_checkpoint,
    load_config,
)
from worker.synth_weights import write_weights


@pytest.fixture
def copy_of(tiny_model, tmp_path):
    def make(arch: str = "llama"):
        out = tmp_path / f"{arch}-copy"
        shutil.copytree(tiny_model(arch), out)
        return out
    return make


def edit_config(model_dir, **changes) -> None:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "mixtral", "qwen2_moe"])
def test_every_family_loads_and_validates(tiny_model, arch):
    config, entries = index_checkpoint(tiny_model(arch))
    assert config.arch == arch and config.architecture in ARCHITECTURES
    assert config.head_dim * config.num_heads == config.hidden_size
    assert config.eos_token_ids and config.dtype == "float32"
    assert config.is_moe == (arch in ("mixtral", "qwen2_moe"))
    assert all(e.nbytes > 0 for e in entries.values())


def test_family_specific_fields(tiny_model):
    llama = load_config(tiny_model("llama"))
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_theta == 500000.0
    assert not llama.attention_bias
    assert load_config(tiny_model("qwen2")).attention_bias
    assert load_config(tiny_model("mistral")).sliding_window == 16
    mixtral = load_config(tiny_model("mixtral"))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_layers) == (4, 2, (0, 1))
    qmoe = load_config(tiny_model("qwen2_moe"))
    assert qmoe.moe_layers == (0,) and qmoe.shared_expert_intermediate_size == 64   # mlp_only_layers=[1]


def test_transformers5_config_style(copy_of, tiny_model):
    """rope_parameters / dtype (what transformers 5 writes) read like rope_theta / torch_dtype."""
    model_dir = copy_of("llama")
    raw = json.loads((model_dir / "config.json").read_text())
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = {**scaling, "rope_theta": raw.pop("rope_theta")}
    raw["dtype"] = raw.pop("torch_dtype")
    (model_dir / "config.json").write_text(json.dumps(raw))
    config = load_config(model_dir)
    assert config == load_config(tiny_model("llama"))
    assert config.rope_scaling["factor"] == 32.0 and config.rope_theta == 500000.0


def test_sharded_checkpoint_loads_the_same(copy_of, tiny_model):
    model_dir = copy_of("qwen2")
    files = write_weights(model_dir, seed=0, init_std=None, shard_bytes=100_000)
    assert len(files) > 2 and (model_dir / "model.safetensors.index.json").is_file()
    assert checkpoint_tensor_files(model_dir) == sorted(files)
    _, single = load_checkpoint(tiny_model("qwen2"))
    _, sharded = load_checkpoint(model_dir)
    assert set(single) == set(sharded)
    assert all(torch.equal(single[n], sharded[n]) for n in single)


def expect_error(model_dir, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        index_checkpoint(model_dir)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_files(copy_of, tmp_path):
    expect_error(tmp_path / "nowhere", "config.json", "not found")
    model_dir = copy_of()
    (model_dir / "tokenizer.json").unlink()
    expect_error(model_dir, "tokenizer.json", "not found")
    model_dir = copy_of("qwen2")
    (model_dir / "model.safetensors").unlink()
    expect_error(model_dir, "no model.safetensors")


def test_corrupt_json_and_unsupported_architecture(copy_of):
    model_dir = copy_of()
    (model_dir / "config.json").write_text("{not json")
    expect_error(model_dir, "config.json", "not valid JSON")
    model_dir = copy_of("mistral")
    edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    message = expect_error(model_dir, "unsupported architecture 'GPT2LMHeadModel'")
    assert all(name in message for name in ARCHITECTURES)


def test_unsupported_options(copy_of):
    model_dir = copy_of()
    edit_config(model_dir, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    expect_error(model_dir, "rope type 'yarn'")
    edit_config(model_dir, rope_scaling=None, hidden_act="gelu")
    expect_error(model_dir, "hidden_act 'gelu'")


def test_corrupt_and_truncated_safetensors(copy_of):
    model_dir = copy_of()
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expect_error(model_dir, "model.safetensors", "truncated")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + data[100:])
    expect_error(model_dir, "model.safetensors", "corrupt safetensors header")
    weights.write_bytes(b"\x03")
    expect_error(model_dir, "truncated")


def test_missing_tensor_shape_and_dtype_mismatch(copy_of):
    model_dir = copy_of()
    _, tensors = load_checkpoint(model_dir)
    tensors = {n: t.clone() for n, t in tensors.items()}
    save_file({n: t for n, t in tensors.items() if "layers.1.mlp.up_proj" not in n},
              str(model_dir / "model.safetensors"))
    expect_error(model_dir, "model.layers.1.mlp.up_proj.weight", "missing")
    save_file(tensors, str(model_dir / "model.safetensors"))
    edit_config(model_dir, intermediate_size=96)
    expect_error(model_dir, "mlp.gate_proj.weight", "shape [128, 64]", "[96, 64]")
    edit_config(model_dir, intermediate_size=128, torch_dtype="bfloat16")
    expect_error(model_dir, "float32", "config.json says bfloat16")
