"""Random-initialized Hugging Face checkpoints (`c2cserve models synth`).

Writes config.json, model.safetensors (sharded past 2 GB, with an index),
tokenizer.json, tokenizer_config.json (with a chat template) and generation_config.json,
in the layout `save_pretrained` writes, without needing transformers.

Presets (MoE archs use the same attention shapes; experts as listed):
  micro  hidden 16, 2 layers, 2 heads / 1 kv, inter 32, vocab 272, tied, bf16; MoE 4
         experts top-2, expert inter 8 (shared 16); a "tiny" for the CUDA simulator
  tiny   hidden 64, 2 layers, 4 heads / 2 kv, inter 128, vocab 512, fp32;
         MoE 4 experts top-2, expert inter 32 (Qwen2-MoE shared 64, layer 1 dense)
  small  hidden 256, 4 layers, 8 heads / 4 kv, inter 768, vocab 2048, bf16;
         MoE 8 experts top-2, expert inter 256 (shared 512)
  0.5b   Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads / 2 kv, inter 4864, vocab 151936,
         tied, bf16; MoE 8 experts top-2, expert inter 1216 (shared 2432)
  1b     Llama-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 kv, inter 8192, vocab 128256,
         tied, bf16; MoE 8 experts top-2, expert inter 2048 (shared 4096)
Real presets train an 8192-entry tokenizer; ids past it are never produced by encode.
Llama-family configs always carry llama3 rope scaling; Mistral tiny has a 16-token
sliding window so tests cover it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from services.errors import InvalidRequest

ARCHS = ("llama", "qwen2", "mistral", "mixtral", "qwen2_moe")
PRESETS = {
    "micro": dict(hidden=16, layers=2, heads=2, kv_heads=1, inter=32, vocab=272, tok_vocab=272,
                  dtype="bfloat16", experts=4, moe_inter=8, shared_inter=16, max_pos=256, tied=True),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=512, tok_vocab=512,
                 dtype="float32", experts=4, moe_inter=32, shared_inter=64, max_pos=2048, tied=False),
    "small": dict(hidden=256, layers=4, heads=8, kv_heads=4, inter=768, vocab=2048, tok_vocab=2048,
                  dtype="bfloat16", experts=8, moe_inter=256, shared_inter=512, max_pos=4096, tied=True),
    "0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, vocab=151936, tok_vocab=8192,
                 dtype="bfloat16", experts=8, moe_inter=1216, shared_inter=2432, max_pos=32768, tied=True),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, vocab=128256, tok_vocab=8192,
               dtype="bfloat16", experts=8, moe_inter=2048, shared_inter=4096, max_pos=131072, tied=True),
}
ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
              "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
DTYPES = ("float32", "bfloat16", "float16")
SHARD_BYTES = 2 * 1024**3
_TEST_PRESETS = ("tiny", "micro")  # carry the features tests cover: llama3 scaling, a window, a dense MoE layer


def synth_model(arch: str, preset: str, out_dir, seed: int = 0, dtype: str | None = None) -> Path:
    """Write a random checkpoint of `arch` at `preset` sizes into out_dir; return out_dir.

    Raises InvalidRequest for an unknown arch, preset or dtype. Deterministic given seed.
    """
    from worker.synth_tokenizer import write_tokenizer
    from worker.synth_weights import write_weights

    _check_choice("arch", arch, ARCHS)
    _check_choice("preset", preset, tuple(PRESETS))
    p = dict(PRESETS[preset])
    p["dtype"] = dtype or p["dtype"]
    _check_choice("dtype", p["dtype"], DTYPES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out, arch, p["tok_vocab"], p["max_pos"])
    vocab = p["vocab"] if p["vocab"] > tok["size"] else tok["size"]
    config = hf_config(arch, preset, p, vocab, tok)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {"bos_token_id": tok["bos_id"], "eos_token_id": tok["gen_eos_ids"],
                  "do_sample": False, "transformers_version": "5.23.0"}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    write_weights(out, seed, init_std=0.02 if preset in ("0.5b", "1b") else None,
                  shard_bytes=SHARD_BYTES)
    return out


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise InvalidRequest(f"unknown {what} {value!r} (choose from: {', '.join(choices)})", param=what)


def hf_config(arch: str, preset: str, p: dict, vocab: int, tok: dict) -> dict:
    """config.json in the transformers-4 style (transformers 5 reads it too)."""
    config = {
        "architectures": [ARCH_CLASS[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": p["hidden"],
        "intermediate_size": p["inter"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "head_dim": p["hidden"] // p["heads"],
        "hidden_act": "silu",
        "max_position_embeddings": p["max_pos"],
        "rms_norm_eps": 1e-6 if arch.startswith("qwen") else 1e-5,
        "rope_theta": 500000.0 if arch == "llama" else 1000000.0,
        "tie_word_embeddings": p["tied"],
        "bos_token_id": tok["bos_id"],
        "eos_token_id": tok["eos_id"],
        "torch_dtype": p["dtype"],
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    config.update(_arch_features(arch, preset, p))
    return config


def _arch_features(arch: str, preset: str, p: dict) -> dict:
    if arch == "llama":
        original = 256 if preset in _TEST_PRESETS else 8192
        return {"attention_bias": False, "mlp_bias": False,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": original}}
    if arch == "qwen2":
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": p["layers"]}
    if arch == "mistral":
        return {"sliding_window": 16 if preset in _TEST_PRESETS else None}
    if arch == "mixtral":
        return {"sliding_window": None, "num_local_experts": p["experts"], "num_experts_per_tok": 2,
                "intermediate_size": p["moe_inter"], "router_aux_loss_coef": 0.001,
                "output_router_logits": False}
    return {  # qwen2_moe
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": p["layers"],
        "num_experts": p["experts"], "num_experts_per_tok": 2, "moe_intermediate_size": p["moe_inter"],
        "shared_expert_intermediate_size": p["shared_inter"], "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [1] if preset in _TEST_PRESETS else [],
        "qkv_bias": True, "router_aux_loss_coef": 0.001, "output_router_logits": False,
    }


# ---- command: c2cserve models synth --------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--arch", required=True, choices=ARCHS, help="model family")
    parser.add_argument("--preset", required=True, choices=tuple(PRESETS), help="sizes (see worker/synth.py)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the preset's)")


def run(args) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidRequest(f"--out {out}: exists and is not a folder", param="out")
    try:
        synth_model(args.arch, args.preset, out, seed=args.seed, dtype=args.dtype)
    except OSError as exc:
        raise InvalidRequest(f"cannot write {out}: {exc.strerror or exc}", param="out") from None
    nbytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.arch}/{args.preset} to {out}: {nbytes / 1e6:.1f} MB of weights "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
