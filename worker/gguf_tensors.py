"""GGUF model files (llama.cpp's format, read with the `gguf` package): tensors and config.

A GGUF file holds a model's tensors under llama.cpp's names (`blk.N.attn_q.weight`, ...),
its config as `<arch>.*` metadata and its tokenizer as `tokenizer.*` metadata. This module
maps the first two onto the project's (Hugging Face) names and config.json; turning a
file into a checkpoint folder is `worker.gguf_checkpoint`.

Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (what Q4_K_M and Q8_0 files
hold), dequantized exactly as llama.cpp does by the package's own reference
(`gguf.quants.dequantize`) to fp32; every value of these types is exact in fp32.
Families: "llama" (llama, mistral: llama.cpp permutes the rows of attn_q / attn_k for its
RoPE kernel; `unpermute_rope_rows` undoes it) and "qwen2" (not permuted). A Llama 3 file's
`rope_freqs.weight` (per-frequency divisors) is turned back into the `llama3` rope_scaling
of config.json and checked to reproduce the divisors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from services.errors import CheckpointError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER_NAMES = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_ORIGINAL_CONTEXT = 8192  # Llama 3.x; files may say otherwise in rope.scaling.original_context_length


def open_gguf(path) -> object:
    """A `gguf.GGUFReader` over the file (memory-mapped); CheckpointError if it is not GGUF."""
    import gguf

    try:
        return gguf.GGUFReader(Path(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from None


def field(reader, key: str, default=None):
    """A metadata value (str, number, or list), or default when the key is absent."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one the model does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of attn_q / attn_k rows: [N, ...] with N = heads * head_dim.

    llama.cpp stores each head's rows as (pairs, 2) interleaved; HF keeps two halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor) -> np.ndarray:
    """A reader tensor as fp32 [rows, cols] (HF order), exactly as llama.cpp dequantizes it."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"GGUF tensor {tensor.name}: type {kind} is not supported ({', '.join(SUPPORTED_TYPES)})")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne0 (the row length) first
    return np.asarray(values, dtype=np.float32).reshape(shape)


def hf_tensors(reader, config: dict) -> Iterator[tuple[str, np.ndarray, str]]:
    """(HF name, fp32 array, GGUF type name) per tensor the model uses, q/k rows un-permuted."""
    is_llama = field(reader, "general.architecture") == "llama"
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        values = dequantized(tensor)
        proj = name.split(".")[-2]
        if is_llama and proj in heads:
            values = unpermute_rope_rows(values, heads[proj])
        yield name, values, tensor.tensor_type.name


def hf_config(reader) -> dict:
    """config.json for the file's model, from its `<arch>.*` metadata (and rope_freqs)."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})")

    def meta(key: str, default=None):
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata {arch}.{key} is missing")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError("GGUF tensor token_embd.weight is missing")
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": int(embed.shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    if ROPE_FREQS in tensors:
        original = int(meta("rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT))
        config["rope_scaling"] = llama3_scaling(dequantized(tensors[ROPE_FREQS]).reshape(-1),
                                                config["rope_theta"], config["head_dim"], original)
    return config


def _f32(value) -> float:
    """A float32 metadata value by its shortest repr (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int, original: int) -> dict:
    """The llama3 rope_scaling whose inverse frequencies are base / divisors.

    factor = the largest divisor; low/high_freq_factor from the smooth band between (the
    band is linear in 1 / wavelength); a file whose divisors no llama3 scaling makes
    raises CheckpointError."""
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / base
    factor = float(divisors.max())
    smooth = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor) if factor > 1 else np.zeros_like(wavelen)
    band = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    low, high = 1.0, 4.0  # Llama 3's, when the band holds too few frequencies to fit
    if band.sum() >= 2:
        slope, intercept = np.polyfit(original / wavelen[band], smooth[band], 1)  # smooth = (L/w - low)/(high - low)
        low, high = -intercept / slope, (1 - intercept) / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 6),
               "high_freq_factor": round(float(high), 6), "original_max_position_embeddings": original}
    if not np.allclose(llama3_divisors(scaling, theta, head_dim), divisors, rtol=1e-3):
        raise CheckpointError("GGUF rope_freqs.weight matches no llama3 rope scaling")
    return scaling


def llama3_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """base / scaled inverse frequency per frequency, as llama.cpp's converter writes them."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / base
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)
