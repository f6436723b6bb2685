"""The serve benchmark's default catalog: 8 synthesized checkpoints (6 dense, 2 MoE).

Each is the `small` preset (real BPE tokenizer, chat template) resized by config.json
overrides to a "medium" shape, synthesized once under DEFAULT_CATALOG and reused. Also
the helpers that read a catalog folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.errors import InvalidRequest

DEFAULT_CATALOG = Path("~/.cache/c2cserve/bench-catalog").expanduser()
# name -> (arch, overrides of the `small` preset's config.json)
_MEDIUM = {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1536,
           "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}
CATALOG_SPEC: dict[str, tuple[str, dict]] = {
    "llama-m0": ("llama", _MEDIUM),
    "qwen2-m1": ("qwen2", _MEDIUM),
    "mistral-m2": ("mistral", _MEDIUM),
    "llama-m3": ("llama", _MEDIUM),
    "qwen2-m4": ("qwen2", _MEDIUM),
    "mistral-m5": ("mistral", _MEDIUM),
    "mixtral-moe6": ("mixtral", {**_MEDIUM, "intermediate_size": 512, "num_local_experts": 8}),
    "qwen2moe-moe7": ("qwen2_moe", {**_MEDIUM, "moe_intermediate_size": 384, "num_experts": 12,
                                     "shared_expert_intermediate_size": 768}),
}


def ensure_default_catalog(root: Path = DEFAULT_CATALOG) -> list[Path]:
    """The 8 benchmark checkpoints under `root`, synthesized once (about 10-30 s)."""
    dirs = []
    for seed, (name, (arch, overrides)) in enumerate(CATALOG_SPEC.items()):
        out = root / name
        if not (out / "config.json").is_file() or not list(out.glob("*.safetensors")):
            print(f"synthesizing {name} ({arch}) under {root} ...", flush=True)
            synth_sized(arch, overrides, out, seed=seed)
        dirs.append(out)
    return dirs


def synth_sized(arch: str, overrides: dict, out: Path, seed: int = 0) -> Path:
    """A `small`-preset checkpoint (tokenizer, template) resized by config.json overrides."""
    from worker.synth import SHARD_BYTES, synth_model
    from worker.synth_weights import write_weights

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    synth_model(arch, "small", tmp, seed=seed)
    config_path = tmp / "config.json"
    config = {**json.loads(config_path.read_text()), **overrides}
    config_path.write_text(json.dumps(config, indent=2))
    write_weights(tmp, seed, None, SHARD_BYTES)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def list_catalog(root: Path) -> list[Path]:
    """Checkpoint folders (with config.json) directly under `root`, by name."""
    if not root.is_dir():
        raise InvalidRequest(f"--catalog {root}: not a folder")
    dirs = sorted(d for d in root.iterdir() if (d / "config.json").is_file())
    if not dirs:
        raise InvalidRequest(f"--catalog {root}: no checkpoint folders (with config.json) inside")
    return dirs


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def context_window(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or 2048)


def describe(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    return {"arch": config.get("model_type"), "weight_bytes": weight_bytes(model_dir),
            "hidden": config.get("hidden_size"), "layers": config.get("num_hidden_layers"), "experts": experts}
