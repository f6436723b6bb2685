"""Write a GGUF file from an HF checkpoint folder the way llama.cpp's converter lays it out
(names, metadata, permuted q/k rows for llama, rope_freqs for llama3 scaling, tokenizer):
the llama.cpp peer of `bench engine` runs the same weights from it, and tests/test_gguf.py
reads such files back."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from worker.checkpoint import load_checkpoint, load_config
from worker.gguf_tensors import _GLOBAL_NAMES, _LAYER_NAMES, ROPE_FREQS, llama3_divisors

Q = gguf.GGMLQuantizationType
_HF_TO_GGUF = {hf: g for g, hf in _GLOBAL_NAMES.items()}


def gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}." + {v: k for k, v in _LAYER_NAMES.items()}[rest]


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (what gguf_tensors.unpermute_rope_rows undoes)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arrays(model_dir: Path, qtype_of) -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (fp32 array as the file stores it, before quantization; type)."""
    config, weights = load_checkpoint(model_dir)
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    out = {}
    for name, t in weights.items():
        values = t.to(torch.float32).numpy()
        if raw["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            values = permute_rope_rows(values, config.num_heads if "q_proj" in name else config.num_kv_heads)
        out[gguf_name(name)] = (values, Q.F32 if values.ndim == 1 else qtype_of(name))
    if config.rope_scaling and config.rope_scaling.get("rope_type") == "llama3":
        out[ROPE_FREQS] = (llama3_divisors(config.rope_scaling, config.rope_theta, config.head_dim).astype(np.float32),
                           Q.F32)
    return out


def write_gguf(model_dir: Path, path: Path, qtype_of=lambda name: Q.F32, pre: str = "default",
               tokenizer_model: str = "gpt2") -> Path:
    """The checkpoint as a GGUF file; qtype_of(hf_name) picks each matrix's type."""
    config = load_config(model_dir)
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    arch = raw["model_type"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling:
        writer.add_rope_scaling_orig_ctx_len(config.rope_scaling["original_max_position_embeddings"])
    _add_tokenizer(writer, Path(model_dir), config.vocab_size, pre, tokenizer_model)
    for name, (values, qtype) in gguf_arrays(model_dir, qtype_of).items():
        data = values if qtype == Q.F32 else gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, model_dir: Path, vocab_size: int, pre: str, tokenizer_model: str) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    id_to_token = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    id_to_token.update({a["id"]: a["content"] for a in spec["added_tokens"]})
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [3 if i in special else (1 if i in id_to_token else 5) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    by_text = {t: i for i, t in enumerate(tokens)}
    if tok_config.get("bos_token"):
        writer.add_bos_token_id(by_text[tok_config["bos_token"]])
    writer.add_eos_token_id(by_text[tok_config["eos_token"]])
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token")))
    writer.add_chat_template(tok_config["chat_template"])
