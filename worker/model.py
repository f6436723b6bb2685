"""The decoder-only model (Llama, Qwen2, Mistral, Mixtral, Qwen2-MoE) over a paged KV cache.

Weights are read-only views (host store or safetensors mmap) in their checkpoint dtype;
activations are fp32; every matrix product goes through `linear`, so the HybridGEMM
kernels plug in without the model knowing. Read top to bottom: embed, layers, norm, head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import c2c_kernels as kernels
from worker.checkpoint import ModelConfig
from worker.forward_batch import AttentionMetadata, ForwardBatch, build_attention_metadata
from worker.layers import (
    EMBED,
    FINAL_NORM,
    FUSED_QKV,
    LM_HEAD,
    SwiGLU,
    layer_prefix,
    paged_attention,
    rope_cos_sin,
    rope_inv_freq,
)
from worker.moe import MoEBlock


@dataclass
class KVCache:
    k: torch.Tensor                # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor                # same
    block_size: int

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32,
                 buffer: torch.Tensor | None = None) -> KVCache:
        """Zeroed K and V; over `buffer` (flat uint8, finite contents, reused) when given."""
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        if buffer is None:
            return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), block_size)
        half = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if buffer.numel() < 2 * half:
            raise ValueError(f"KV buffer of {buffer.numel()} bytes < the {2 * half} needed")
        k, v = (buffer[i * half:(i + 1) * half].view(dtype).view(shape) for i in range(2))
        return cls(k, v, block_size)

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])


def kv_bytes_per_token(config: ModelConfig, dtype=torch.float32) -> int:
    """K and V bytes one token occupies across all layers."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * item


@dataclass
class AttentionWeights:
    qkv: list[torch.Tensor]            # [q|k|v fused] or [q, k, v]: [out, H] each
    qkv_bias: list[torch.Tensor | None]
    o: torch.Tensor                    # [H, nH * D]
    o_bias: torch.Tensor | None


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: AttentionWeights
    mlp: SwiGLU | None             # dense layer
    moe: MoEBlock | None


class CausalLM:
    """forward(batch, kv) -> [S, vocab] fp32 logits for the tokens at batch.logits_indices."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 linear: Callable = kernels.linear, compute_dtype=torch.float32):
        self.config = config
        self.linear = linear
        self.compute_dtype = compute_dtype
        self.embed = weights[EMBED]
        self.final_norm = weights[FINAL_NORM].float()  # norm vectors widened once (tiny)
        # tied: the embedding, unless the store added a quantized copy of it as the head
        self.lm_head = weights.get(LM_HEAD, self.embed) if config.tie_word_embeddings else weights[LM_HEAD]
        self.layers = [decoder_layer(config, i, weights) for i in range(config.num_layers)]
        self.inv_freq = rope_inv_freq(config)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        return self.forward_layers(batch, kv, 0, len(self.layers))

    @torch.inference_mode()
    def forward_layers(self, batch: ForwardBatch, kv: KVCache, start: int, end: int,
                       x: torch.Tensor | None = None) -> torch.Tensor:
        """Layers [start, end) of the forward pass (a pipeline stage; KV indexed by absolute layer).

        The first stage (start 0) embeds the input ids; a later one takes `x`, the residual
        stream [T, H] fp32 the previous stage returned (added to in place). The last stage
        (end = num_layers) returns [S, vocab] logits, the others the residual stream [T, H].
        """
        meta = build_attention_metadata(batch, kv.block_size, self.config.sliding_window)
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq)     # [T, 1, D]
        if start == 0:
            x = self.embed[batch.input_ids].to(self.compute_dtype)  # [T, H] residual stream
        eps, delta = self.config.rms_norm_eps, None                 # delta: a block's output
        for i in range(start, end):
            layer = self.layers[i]
            h = kernels.add_rms_norm(x, delta, layer.input_norm, eps)   # x += delta; norm(x)
            delta = self._attention(h, layer.attn, cos, sin, kv, i, meta)
            h = kernels.add_rms_norm(x, delta, layer.post_norm, eps)
            delta = self._mlp(h, layer)
        x += delta
        if end < len(self.layers):
            return x
        x = x[batch.logits_indices].contiguous()                   # [S, H]
        return self.linear(kernels.add_rms_norm(x, None, self.final_norm, eps), self.lm_head)

    __call__ = forward

    def _attention(self, x, w: AttentionWeights, cos, sin, kv: KVCache, layer: int,
                   meta: AttentionMetadata) -> torch.Tensor:
        cfg, n, dim = self.config, x.shape[0], self.config.head_dim
        num_qk_heads = cfg.num_heads + cfg.num_kv_heads
        if len(w.qkv) == 1:  # q|k are adjacent in the fused output: one RoPE call for both
            qkv = self.linear(x, w.qkv[0], w.qkv_bias[0])                      # [T, (nH + 2 nKV) D]
            qk = kernels.rope_(qkv[:, :num_qk_heads * dim].view(n, num_qk_heads, dim), cos, sin)
            q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)         # [T, nH, D], [T, nKV, D]
            v = qkv[:, num_qk_heads * dim:].view(n, cfg.num_kv_heads, dim)
        else:
            q, k, v = (self.linear(x, m, b) for m, b in zip(w.qkv, w.qkv_bias, strict=True))
            q = kernels.rope_(q.view(n, cfg.num_heads, dim), cos, sin)        # [T, nH, D]
            k = kernels.rope_(k.view(n, cfg.num_kv_heads, dim), cos, sin)     # [T, nKV, D]
            v = v.view(n, cfg.num_kv_heads, dim)
        out = paged_attention(q, k, v, kv.k[layer], kv.v[layer], meta)            # [T, nH*D]
        return self.linear(out.contiguous(), w.o, w.o_bias)

    def _mlp(self, x: torch.Tensor, layer: DecoderLayer) -> torch.Tensor:
        if layer.moe is not None:
            return layer.moe(x, self.linear)
        return layer.mlp(x, self.linear)

    def kv_bytes_per_token(self, dtype=None) -> int:
        return kv_bytes_per_token(self.config, dtype or self.compute_dtype)

    def weight_bytes(self) -> int:
        """Bytes of distinct weight tensors this model reads (tied head counted once)."""
        seen, total = set(), 0
        for w in self._all_weights():
            for t in (w.tensors() if isinstance(w, kernels.QUANTIZED) else (w,)):
                if t is not None and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    def read_bytes_per_step(self) -> int:
        """Weight bytes one decode step streams: weight_bytes less an embedding that is only
        looked up (a tied head with a quantized copy of its own, or an untied head)."""
        embed_bytes = self.embed.numel() * self.embed.element_size()
        return self.weight_bytes() - (0 if self.lm_head is self.embed else embed_bytes)

    def _all_weights(self):
        yield from (self.embed, self.final_norm, self.lm_head)
        for layer in self.layers:
            yield from (layer.input_norm, layer.post_norm, layer.attn.o, layer.attn.o_bias,
                        *layer.attn.qkv, *layer.attn.qkv_bias)
            if layer.mlp is not None:
                yield from layer.mlp.tensors()
            if layer.moe is not None:
                yield from (layer.moe.router, layer.moe.shared_gate)
                for mlp in [*layer.moe.experts, *([layer.moe.shared] if layer.moe.shared else [])]:
                    yield from mlp.tensors()


def decoder_layer(config: ModelConfig, i: int, weights: dict[str, torch.Tensor]) -> DecoderLayer:
    p = layer_prefix(i)
    if i in config.moe_layers:
        mlp, moe = None, MoEBlock.from_weights(config, i, weights)
    else:
        mlp, moe = SwiGLU.from_weights(f"{p}.mlp", weights), None
    norms = (weights[f"{p}.input_layernorm.weight"].float(), weights[f"{p}.post_attention_layernorm.weight"].float())
    return DecoderLayer(*norms,
                        _attention_weights(f"{p}.self_attn", weights), mlp, moe)


def _attention_weights(a: str, weights: dict[str, torch.Tensor]) -> AttentionWeights:
    """Uses the host store's fused q|k|v matrix (one kernel call) when it is there."""
    o, o_bias = weights[f"{a}.o_proj.weight"], weights.get(f"{a}.o_proj.bias")
    has_fused_bias = f"{a}.{FUSED_QKV}.bias" in weights or f"{a}.q_proj.bias" not in weights
    if f"{a}.{FUSED_QKV}.weight" in weights and has_fused_bias:
        return AttentionWeights([weights[f"{a}.{FUSED_QKV}.weight"]], [weights.get(f"{a}.{FUSED_QKV}.bias")],
                                o, o_bias)
    names = ("q_proj", "k_proj", "v_proj")
    return AttentionWeights([weights[f"{a}.{n}.weight"] for n in names],
                            [weights.get(f"{a}.{n}.bias") for n in names], o, o_bias)
