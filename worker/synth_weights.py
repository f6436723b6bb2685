"""Random weights for a synthesized checkpoint, written with `safetensors` (no transformers).

Tensor names and shapes come from the same spec the loader validates against, in the
layout `save_pretrained` writes (Mixtral: `block_sparse_moe.experts.{e}.w1|w2|w3`).
Big tensors are drawn in row chunks, in parallel threads (each chunk its own seeded
generator, so results do not depend on the thread count), and streamed to the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from worker.checkpoint import ModelConfig, load_config
from worker.layers import expected_tensors

_CHUNK_ELEMENTS = 16 * 1024 * 1024
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
                  init_std: float | None, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """Norm weights ~1, biases small, matrices N(0, std) with std = init_std or fan_in^-1/2.

    Row chunks draw from their own generator seeded by (seed, name, chunk), so the result
    does not depend on how many threads fill it.
    """
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=_generator(seed, name, 0))).to(dtype)
    if name.endswith(".bias"):
        return (0.1 * torch.randn(shape, generator=_generator(seed, name, 0))).to(dtype)
    std = init_std if init_std is not None else shape[-1] ** -0.5
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1, shape[-1])                         # [rows, fan_in]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // shape[-1])

    def fill(chunk: int) -> None:
        r0 = chunk * rows_per_chunk
        rows = min(rows_per_chunk, flat.shape[0] - r0)
        gen = _generator(seed, name, chunk)
        flat[r0:r0 + rows] = torch.randn(rows, shape[-1], generator=gen).mul_(std)

    chunks = range(-(-flat.shape[0] // rows_per_chunk))
    if pool is None or len(chunks) == 1:
        for chunk in chunks:
            fill(chunk)
    else:
        list(pool.map(fill, chunks))
    return out


def _generator(seed: int, name: str, chunk: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}:{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def write_weights(out: Path, seed: int, init_std: float | None, shard_bytes: int) -> list[Path]:
    """Draw and save every tensor config.json in `out` asks for; return the files written."""
    config = load_config(out)
    dtype = _TORCH_DTYPES[config.dtype]
    shapes = expected_tensors(config, layout_hint(config))
    shards = plan_shards(shapes, torch.empty((), dtype=dtype).element_size(), shard_bytes)
    names = _file_names(len(shards))
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    weight_map: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for file_name, shard in zip(names, shards, strict=True):
            draw = lambda n: random_tensor(n, shapes[n], dtype, seed, init_std, pool)  # noqa: E731
            write_safetensors(out / file_name, {n: shapes[n] for n in shard}, dtype, draw)
            weight_map.update(dict.fromkeys(shard, file_name))
    if len(shards) > 1:
        total = sum(f.stat().st_size for f in (out / n for n in names))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [out / n for n in names]


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, draw) -> None:
    """Stream a safetensors file: header first, then each tensor as `draw(name)` makes it."""
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * item
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in shapes:
            f.write(draw(name).contiguous().view(-1).view(torch.uint8).numpy().data)


def _file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
