"""Weight names and dense building blocks: RMSNorm, RoPE, paged GQA attention.

Activations are fp32; weights stay in their checkpoint dtype and every matrix product
goes through the `linear` kernel passed in (so the Numba / CUDA kernels plug in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import c2c_kernels as kernels
from worker.checkpoint import ModelConfig

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


# ---- names and shapes -------------------------------------------------------------

def expected_tensors(config: ModelConfig, present: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape; `present` picks the expert layout."""
    from worker.moe import expected_moe_tensors

    present = set(present)
    h, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (v, h), FINAL_NORM: (h,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (v, h)
    for layer in range(config.num_layers):
        shapes.update(_attention_shapes(config, layer))
        if layer in config.moe_layers:
            shapes.update(expected_moe_tensors(config, layer, present))
        else:
            shapes.update(_mlp_shapes(f"{layer_prefix(layer)}.mlp", h, config.intermediate_size))
    return shapes


def _attention_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    p, h = layer_prefix(layer), config.hidden_size
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    shapes = {
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
        f"{p}.self_attn.q_proj.weight": (q_dim, h),
        f"{p}.self_attn.k_proj.weight": (kv_dim, h),
        f"{p}.self_attn.v_proj.weight": (kv_dim, h),
        f"{p}.self_attn.o_proj.weight": (h, q_dim),
    }
    if config.attention_bias:
        shapes[f"{p}.self_attn.q_proj.bias"] = (q_dim,)
        shapes[f"{p}.self_attn.k_proj.bias"] = (kv_dim,)
        shapes[f"{p}.self_attn.v_proj.bias"] = (kv_dim,)
    if config.o_proj_bias:
        shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }


# ---- blocks -----------------------------------------------------------------------

def swiglu_mlp(x: torch.Tensor, gate_w, up_w, down_w, linear) -> torch.Tensor:
    # x: [T, H] -> [T, H]
    return linear(F.silu(linear(x, gate_w)) * linear(x, up_w), down_w)


@dataclass
class SwiGLU:
    """down(silu(gate(x)) * up(x)); one fused gate|up matrix when the store provides it."""

    gate: torch.Tensor | None      # [I, H] (None when fused)
    up: torch.Tensor | None        # [I, H]
    gate_up: torch.Tensor | None   # [2I, H]
    down: torch.Tensor             # [H, I]

    @classmethod
    def from_weights(cls, prefix: str, weights: dict[str, torch.Tensor],
                     names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> SwiGLU:
        down = weights[f"{prefix}.{names[2]}.weight"]
        fused = weights.get(f"{prefix}.{FUSED_GATE_UP}.weight")
        if fused is not None:
            return cls(None, None, fused, down)
        return cls(weights[f"{prefix}.{names[0]}.weight"], weights[f"{prefix}.{names[1]}.weight"], None, down)

    def __call__(self, x: torch.Tensor, linear) -> torch.Tensor:
        if self.gate_up is None:
            return swiglu_mlp(x, self.gate, self.up, self.down, linear)
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)   # [T, I] each
        return linear(F.silu(gate) * up, self.down)

    def tensors(self) -> tuple:
        return (self.down,) + ((self.gate, self.up) if self.gate_up is None else (self.gate_up,))


# ---- fused matrices (built by the host store: row-concatenations, zero-copy) ------

FUSED_QKV = "qkv_proj"
FUSED_GATE_UP = "gate_up_proj"
_FUSIONS = (  # (suffix of the first part, suffixes of all parts, fused suffix)
    ("self_attn.q_proj.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"), f"{FUSED_QKV}.weight"),
    ("self_attn.q_proj.bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias"), f"{FUSED_QKV}.bias"),
    ("gate_proj.weight", ("gate_proj.weight", "up_proj.weight"), f"{FUSED_GATE_UP}.weight"),
    (".w1.weight", ("w1.weight", "w3.weight"), f"{FUSED_GATE_UP}.weight"),
)


def fusion_groups(shapes: dict[str, tuple[tuple[int, ...], str]]) -> list[tuple[str, tuple[str, ...]]]:
    """(fused name, part names) for q|k|v and gate|up; shapes maps name -> (shape, dtype).

    Parts are stacked along rows, so each part is a contiguous row range of the fused one.
    """
    groups = []
    for name in sorted(shapes):
        for first, suffixes, fused_suffix in _FUSIONS:
            if not name.endswith(first):
                continue
            base = name[: -len(suffixes[0])]
            parts = tuple(base + s for s in suffixes)
            infos = [shapes.get(p) for p in parts]
            if all(i is not None and i[0][1:] == infos[0][0][1:] and i[1] == infos[0][1] for i in infos):
                groups.append((base + fused_suffix, parts))
    return groups


def without_fused_parts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights minus the parts that also stand in a fused matrix (the model uses those)."""
    shapes = {n: (tuple(t.shape), str(t.dtype)) for n, t in weights.items()}
    parts = {p for fused, group in fusion_groups(shapes) if fused in weights for p in group}
    return {n: t for n, t in weights.items() if n not in parts}


def with_quantized_weights(weights: dict) -> dict:
    """Each quantized matrix with its `<name>_scale` (host store, quantize="int8" | "q4") as
    one weight object under the matrix's name: int8 [N, K] + fp32 [N] -> `kernels.Int8Weight`,
    uint8 [N, K/2] + fp16 [N, K/32] -> `kernels.Q4Weight`; other tensors as they are."""
    out = {}
    for name, t in weights.items():
        scale = weights.get(name + "_scale")
        if name.endswith("_scale") and name[: -len("_scale")] in weights:
            continue
        if scale is not None and t.dtype == torch.int8:
            t = kernels.Int8Weight(t, scale)
        elif scale is not None and t.dtype == torch.uint8 and scale.dtype == torch.float16:
            t = kernels.Q4Weight(t, scale)
        out[name] = t
    return out


def quantize_weights(weights: dict, mode: str = "int8") -> dict:
    """Quantize in memory what the host store would (the "load" residency's counterpart);
    mode "int8" | "q4" (q4 leaves a matrix whose K is no multiple of 32 as it is)."""
    from c2c_kernels.cpu_int8 import quantize_int8
    from c2c_kernels.cpu_q4 import can_quantize_q4, quantize_q4

    out = dict(weights)
    if EMBED in weights and LM_HEAD not in weights:
        out[LM_HEAD] = weights[EMBED]  # tied: the head gets a quantized copy, lookups keep the embedding
    for name, t in list(out.items()):
        if not (isinstance(t, torch.Tensor) and t.dim() == 2 and name.endswith(QUANTIZED_SUFFIXES)):
            continue
        if mode == "int8":
            out[name] = kernels.Int8Weight(*quantize_int8(t))
        elif can_quantize_q4(t.shape):
            out[name] = kernels.Q4Weight(*quantize_q4(t))
    return out


QUANTIZED_SUFFIXES = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", LM_HEAD)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] fp32, computed the way transformers does."""
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (config.rope_theta ** exponent)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        return inv_freq / float(scaling["factor"])
    if scaling.get("rope_type") == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: [T] -> cos, sin: [T, 1, head_dim] (broadcast over heads)
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


# ---- paged attention --------------------------------------------------------------

def paged_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta) -> torch.Tensor:
    """Write this step's k/v into the paged cache, then attend over each sequence's context.

    q: [T, nH, D] fp32; k_new, v_new: [T, nKV, D]; k_cache, v_cache: [num_blocks, block_size,
    nKV, D] of one layer; meta: AttentionMetadata. Returns [T, nH * D] fp32.
    """
    if meta.is_decode and kernels.can_use_decode_attention(q, k_cache):
        out = kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, meta.slot_mapping,
                                       meta.padded_blocks, meta.decode_lows, meta.decode_lens,
                                       meta.decode_max_keys)
        return out.view(q.shape[0], -1)
    num_kv, dim = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, num_kv, dim).index_copy_(0, meta.slot_mapping, k_new.to(k_cache.dtype))
    v_cache.view(-1, num_kv, dim).index_copy_(0, meta.slot_mapping, v_new.to(v_cache.dtype))
    if meta.is_decode:
        out = _decode_attention(q, k_cache, v_cache, meta)
    else:
        out = torch.cat([_sequence_attention(q, k_cache, v_cache, meta, i)
                         for i in range(len(meta.query_lens))], dim=0)
    return out.reshape(q.shape[0], -1)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    # cache: [num_blocks, bs, nKV, D]; blocks: [n] -> [n * bs, nKV, D] fp32
    out = cache.index_select(0, blocks)
    return out.view(-1, *cache.shape[2:]).to(torch.float32)


def _decode_attention(q, k_cache, v_cache, meta) -> torch.Tensor:
    # one query token per sequence: gather padded contexts, one SDPA call for the batch
    num_seqs, span = meta.padded_blocks.shape[0], meta.padded_blocks.numel() * k_cache.shape[1]
    flat = meta.padded_blocks.view(-1)
    keep = meta.decode_span                                              # valid (or masked) keys
    k = _gather_blocks(k_cache, flat).view(num_seqs, span // num_seqs, *k_cache.shape[2:])[:, :keep]
    v = _gather_blocks(v_cache, flat).view(num_seqs, span // num_seqs, *v_cache.shape[2:])[:, :keep]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=meta.decode_mask, enable_gqa=True)  # [S, nH, 1, D]
    return out[:, :, 0, :]


def _sequence_attention(q, k_cache, v_cache, meta, i: int) -> torch.Tensor:
    start, q_len, context_len = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
    blocks = meta.context_blocks[i]
    k = _gather_blocks(k_cache, blocks)[:context_len].transpose(0, 1)   # [nKV, L, D]
    v = _gather_blocks(v_cache, blocks)[:context_len].transpose(0, 1)
    q_i = q[start:start + q_len].transpose(0, 1)                        # [nH, q_len, D]
    mask = meta.prefill_masks[i]
    out = F.scaled_dot_product_attention(q_i, k, v, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=True)               # [nH, q_len, D]
    return out.transpose(0, 1)                                          # [q_len, nH, D]
