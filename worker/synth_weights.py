"""Random weights for a synthesized checkpoint, written with `safetensors` (no transformers).

Tensor names and shapes come from the same spec the loader validates against, in the
layout `save_pretrained` writes (Mixtral: `block_sparse_moe.experts.{e}.w1|w2|w3`).
Big tensors are drawn in row chunks so a 1B model needs little extra memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.checkpoint import ModelConfig, load_config
from worker.layers import expected_tensors

_CHUNK_ELEMENTS = 16 * 1024 * 1024
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layout_hint(config: ModelConfig) -> set[str]:
    """Names that make the spec pick the save_pretrained layout for Mixtral experts."""
    if config.arch != "mixtral":
        return set()
    hint = set()
    for i in config.moe_layers:
        hint.add(f"model.layers.{i}.block_sparse_moe.gate.weight")
        hint.add(f"model.layers.{i}.block_sparse_moe.experts.0.w1.weight")
    return hint


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_shards(shapes: dict[str, tuple[int, ...]], item_bytes: int, shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(shapes, key=_natural_key):
        nbytes = item_bytes
        for dim in shapes[name]:
            nbytes *= dim
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
                  init_std: float | None) -> torch.Tensor:
    """Norm weights ~1, biases small, matrices N(0, std) with std = init_std or fan_in^-1/2."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if name.endswith(".bias"):
        return (0.1 * torch.randn(shape, generator=gen)).to(dtype)
    std = init_std if init_std is not None else shape[-1] ** -0.5
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1, shape[-1])                         # [rows, fan_in]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // shape[-1])
    for r0 in range(0, flat.shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, flat.shape[0] - r0)
        flat[r0:r0 + rows] = torch.randn(rows, shape[-1], generator=gen).mul_(std)
    return out


def write_weights(out: Path, seed: int, init_std: float | None, shard_bytes: int) -> list[Path]:
    """Draw and save every tensor config.json in `out` asks for; return the files written."""
    config = load_config(out)
    dtype = _TORCH_DTYPES[config.dtype]
    shapes = expected_tensors(config, layout_hint(config))
    shards = plan_shards(shapes, torch.empty((), dtype=dtype).element_size(), shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    names = _file_names(len(shards))
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {n: random_tensor(n, shapes[n], dtype, gen, init_std) for n in shard}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
        del tensors
    if len(shards) > 1:
        total = sum(f.stat().st_size for f in (out / n for n in names))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [out / n for n in names]


def _file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
