"""The decoder-only model (Llama, Qwen2, Mistral, Mixtral, Qwen2-MoE) over a paged KV cache.

Weights are read-only views (host store or safetensors mmap) in their checkpoint dtype;
activations are fp32; every matrix product goes through `linear`, so the HybridGEMM
kernels plug in without the model knowing. Read top to bottom: embed, layers, norm, head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import kernels
from worker.checkpoint import ModelConfig
from worker.forward_batch import AttentionMetadata, ForwardBatch, build_attention_metadata
from worker.layers import (EMBED, FINAL_NORM, LM_HEAD, apply_rope, layer_prefix, paged_attention,
                           rms_norm, rope_cos_sin, rope_inv_freq, swiglu_mlp)
from worker.moe import MoEBlock


@dataclass
class KVCache:
    k: torch.Tensor                # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor                # same
    block_size: int

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32) -> KVCache:
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), block_size)

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])


def kv_bytes_per_token(config: ModelConfig, dtype=torch.float32) -> int:
    """K and V bytes one token occupies across all layers."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * item


@dataclass
class AttentionWeights:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: AttentionWeights
    mlp: tuple | None              # (gate, up, down) for a dense layer
    moe: MoEBlock | None


class CausalLM:
    """forward(batch, kv) -> [S, vocab] fp32 logits for the tokens at batch.logits_indices."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 linear: Callable = kernels.linear, compute_dtype=torch.float32):
        self.config = config
        self.linear = linear
        self.compute_dtype = compute_dtype
        self.embed = weights[EMBED]
        self.final_norm = weights[FINAL_NORM]
        self.lm_head = self.embed if config.tie_word_embeddings else weights[LM_HEAD]
        self.layers = [_decoder_layer(config, i, weights) for i in range(config.num_layers)]
        self.inv_freq = rope_inv_freq(config)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        meta = build_attention_metadata(batch, kv.block_size, self.config.sliding_window)
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq)     # [T, 1, D]
        x = self.embed[batch.input_ids].to(self.compute_dtype)      # [T, H]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(rms_norm(x, layer.input_norm, self.config.rms_norm_eps),
                                    layer.attn, cos, sin, kv, i, meta)
            x = x + self._mlp(rms_norm(x, layer.post_norm, self.config.rms_norm_eps), layer)
        x = x[batch.logits_indices].contiguous()                   # [S, H]
        return self.linear(rms_norm(x, self.final_norm, self.config.rms_norm_eps), self.lm_head)

    __call__ = forward

    def _attention(self, x, w: AttentionWeights, cos, sin, kv: KVCache, layer: int,
                   meta: AttentionMetadata) -> torch.Tensor:
        cfg, n = self.config, x.shape[0]
        q = self.linear(x, w.q, w.q_bias).view(n, cfg.num_heads, cfg.head_dim)     # [T, nH, D]
        k = self.linear(x, w.k, w.k_bias).view(n, cfg.num_kv_heads, cfg.head_dim)  # [T, nKV, D]
        v = self.linear(x, w.v, w.v_bias).view(n, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, kv.k[layer], kv.v[layer], meta)            # [T, nH*D]
        return self.linear(out.contiguous(), w.o, w.o_bias)

    def _mlp(self, x: torch.Tensor, layer: DecoderLayer) -> torch.Tensor:
        if layer.moe is not None:
            return layer.moe(x, self.linear)
        return swiglu_mlp(x, *layer.mlp, linear=self.linear)

    def kv_bytes_per_token(self, dtype=None) -> int:
        return kv_bytes_per_token(self.config, dtype or self.compute_dtype)

    def weight_bytes(self) -> int:
        """Bytes of distinct weight tensors this model reads (tied head counted once)."""
        seen, total = set(), 0
        for t in self._all_weights():
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def _all_weights(self):
        yield from (self.embed, self.final_norm, self.lm_head)
        for layer in self.layers:
            yield from (layer.input_norm, layer.post_norm, *vars(layer.attn).values())
            if layer.mlp is not None:
                yield from layer.mlp
            if layer.moe is not None:
                yield from (layer.moe.router, layer.moe.shared_gate, *(layer.moe.shared or ()))
                for e in layer.moe.experts:
                    yield from (e.gate, e.up, e.down) if e.gate_up is None else (e.gate_up, e.down)


def _decoder_layer(config: ModelConfig, i: int, weights: dict[str, torch.Tensor]) -> DecoderLayer:
    p = layer_prefix(i)
    a = f"{p}.self_attn"
    attn = AttentionWeights(
        weights[f"{a}.q_proj.weight"], weights[f"{a}.k_proj.weight"],
        weights[f"{a}.v_proj.weight"], weights[f"{a}.o_proj.weight"],
        weights.get(f"{a}.q_proj.bias"), weights.get(f"{a}.k_proj.bias"),
        weights.get(f"{a}.v_proj.bias"), weights.get(f"{a}.o_proj.bias"))
    if i in config.moe_layers:
        mlp, moe = None, MoEBlock.from_weights(config, i, weights)
    else:
        mlp = tuple(weights[f"{p}.mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        moe = None
    return DecoderLayer(weights[f"{p}.input_layernorm.weight"], weights[f"{p}.post_attention_layernorm.weight"],
                        attn, mlp, moe)
