"""Hugging Face checkpoint folders: config, tensor files, validation.

A checkpoint is `config.json` + `model.safetensors` (or shards listed in
`model.safetensors.index.json`) + `tokenizer.json`. Everything a user can get wrong here
raises `CheckpointError` whose message names the file and the problem, in one line.

Both config styles are read: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`)
and transformers 5 (`rope_parameters`, `dtype`). MoE experts are accepted per expert
(`experts.{e}.w1|w2|w3` or `experts.{e}.gate_proj|up_proj|down_proj`, what
`save_pretrained` writes) or fused 3-D (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from services.errors import CheckpointError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
DTYPES = ("bfloat16", "float16", "float32")
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4,
               "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
ROPE_TYPES = ("default", "llama3", "linear")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # appended (optional) fields
    moe_layers: tuple[int, ...] = ()     # layers whose MLP is a routed MoE block
    o_proj_bias: bool = False            # Llama attention_bias also biases o_proj

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: str                 # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    path: Path
    start: int                 # absolute byte offset in the file
    nbytes: int


def load_config(model_dir) -> ModelConfig:
    """Read `config.json` (+ `generation_config.json` for EOS ids) into a ModelConfig.

    Raises CheckpointError for a missing or corrupt file, an unsupported architecture,
    activation, rope type or option, naming the file.
    """
    path = Path(model_dir) / "config.json"
    raw = _read_json(path)
    architecture = _architecture(raw, path)
    arch = ARCHITECTURES[architecture]
    try:
        return _build_config(raw, arch, architecture, Path(model_dir), path)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad or missing field ({type(exc).__name__}: {exc})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _architecture(raw: dict, path: Path) -> str:
    names = raw.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if not names:
        raise CheckpointError(f"{path}: no 'architectures' field (supported: {supported})")
    if names[0] not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported architecture {names[0]!r} (supported: {supported})")
    return names[0]


def _build_config(raw: dict, arch: str, architecture: str, model_dir: Path, path: Path) -> ModelConfig:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported")
    hidden, num_heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    num_layers = int(raw["num_hidden_layers"])
    rope_theta, rope_scaling = _rope(raw, path)
    num_experts, top_k, moe_inter, shared_inter, norm_topk, moe_layers = _moe(raw, arch, num_layers)
    eos_ids, bos_id = _special_ids(raw, model_dir)
    return ModelConfig(
        arch=arch, architecture=architecture,
        vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(raw.get("intermediate_size") or 0),
        num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=_attention_bias(raw, arch),
        sliding_window=_sliding_window(raw, arch, path),
        num_experts=num_experts, num_experts_per_tok=top_k,
        moe_intermediate_size=moe_inter, shared_expert_intermediate_size=shared_inter,
        norm_topk_prob=norm_topk, dtype=_config_dtype(raw, path),
        eos_token_ids=eos_ids, bos_token_id=bos_id,
        moe_layers=moe_layers,
        o_proj_bias=arch == "llama" and bool(raw.get("attention_bias", False)),
    )


def _rope(raw: dict, path: Path) -> tuple[float, dict | None]:
    """rope_theta and the scaling dict (None for plain RoPE), from either config style."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _attention_bias(raw: dict, arch: str) -> bool:
    if arch == "qwen2":
        return True
    if arch == "qwen2_moe":
        return bool(raw.get("qkv_bias", True))
    return bool(raw.get("attention_bias", False))


def _sliding_window(raw: dict, arch: str, path: Path) -> int | None:
    if arch in ("qwen2", "qwen2_moe"):
        if raw.get("use_sliding_window"):
            raise CheckpointError(f"{path}: use_sliding_window=true is not supported for {arch}")
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def _moe(raw: dict, arch: str, num_layers: int):
    """(num_experts, top_k, moe_inter, shared_inter, norm_topk_prob, moe_layers)."""
    if arch == "mixtral":
        num_experts = int(raw.get("num_local_experts", 8))
        return (num_experts, int(raw.get("num_experts_per_tok", 2)), int(raw["intermediate_size"]),
                0, True, tuple(range(num_layers)))
    if arch == "qwen2_moe":
        num_experts = int(raw.get("num_experts", 60))
        step = int(raw.get("decoder_sparse_step", 1) or 1)
        mlp_only = set(raw.get("mlp_only_layers") or [])
        layers = tuple(i for i in range(num_layers)
                       if num_experts > 0 and i not in mlp_only and (i + 1) % step == 0)
        return (num_experts, int(raw.get("num_experts_per_tok", 4)), int(raw["moe_intermediate_size"]),
                int(raw.get("shared_expert_intermediate_size") or 0),
                bool(raw.get("norm_topk_prob", False)), layers)
    return 0, 0, 0, 0, False, ()


def _config_dtype(raw: dict, path: Path) -> str:
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    return dtype


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _special_ids(raw: dict, model_dir: Path) -> tuple[tuple[int, ...], int | None]:
    eos = _as_ids(raw.get("eos_token_id"))
    bos = raw.get("bos_token_id")
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        eos += [i for i in _as_ids(gen.get("eos_token_id")) if i not in eos]
        bos = bos if bos is not None else gen.get("bos_token_id")
    return tuple(eos), (int(bos) if bos is not None else None)


# ---- tensor files -----------------------------------------------------------------

def checkpoint_tensor_files(model_dir) -> list[Path]:
    """The safetensors files of a checkpoint: `model.safetensors` or the index's shards."""
    model_dir = Path(model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index_path}: shard {file.name} not found")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint folder not found")
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header and check every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len})")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    data_start = 8 + header_len
    return {name: _entry(path, name, info, data_start, size)
            for name, info in header.items() if name != "__metadata__"}


def _entry(path: Path, name: str, info, data_start: int, size: int) -> TensorEntry:
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    numel = 1
    for dim in shape:
        numel *= dim
    if end - begin != numel * DTYPE_BYTES[dtype] or begin < 0:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, shape {list(shape)} needs {numel * DTYPE_BYTES[dtype]}")
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {size}")
    return TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)


def index_checkpoint(model_dir, config: ModelConfig | None = None,
                     require_tokenizer: bool = True) -> tuple[ModelConfig, dict[str, TensorEntry]]:
    """Validate a whole checkpoint folder; return its config and every tensor's location.

    Raises CheckpointError for a missing tokenizer, a missing or misshapen tensor, or a
    weight whose dtype differs from the config's.
    """
    from worker.layers import expected_tensors

    model_dir = Path(model_dir)
    config = config or load_config(model_dir)
    if require_tokenizer and not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: file not found")
    entries: dict[str, TensorEntry] = {}
    for file in checkpoint_tensor_files(model_dir):
        entries.update(read_safetensors_header(file))
    for name, shape in expected_tensors(config, entries.keys()).items():
        entry = entries.get(name)
        if entry is None:
            raise CheckpointError(f"{model_dir}: tensor {name!r} missing from the checkpoint")
        if entry.shape != shape:
            raise CheckpointError(f"{entry.path}: tensor {name!r} has shape {list(entry.shape)}, config needs {list(shape)}")
        if entry.dtype != config.dtype and entry.dtype in DTYPES:
            raise CheckpointError(f"{entry.path}: tensor {name!r} is {entry.dtype} but config.json says {config.dtype}")
    return config, entries


def load_checkpoint(model_dir, require_tokenizer: bool = False):
    """(config, tensors) read straight from the safetensors files (mmap, no host store)."""
    import torch
    from safetensors import safe_open

    config, entries = index_checkpoint(model_dir, require_tokenizer=require_tokenizer)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({e.path for e in entries.values()}):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return config, tensors
