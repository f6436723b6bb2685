"""Routed mixture-of-experts blocks (Mixtral, Qwen2-MoE) and their weight layouts.

Three expert layouts are read: per expert `experts.{e}.w1|w3|w2` (Mixtral, what
`save_pretrained` writes), per expert `experts.{e}.gate_proj|up_proj|down_proj`
(Qwen2-MoE), and fused 3-D `experts.gate_up_proj` [E, 2I, H] + `experts.down_proj`
[E, H, I] (transformers 5 in-memory layout). Only experts that received tokens run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import c2c_kernels as kernels
from worker.checkpoint import ModelConfig
from worker.layers import SwiGLU, layer_prefix

_PER_EXPERT = {"w123": ("w1", "w3", "w2"), "proj": ("gate_proj", "up_proj", "down_proj")}


def moe_prefix(config: ModelConfig, layer: int, present: set[str]) -> str:
    """Mixtral checkpoints name the block `block_sparse_moe` (or `mlp` when fused)."""
    p = layer_prefix(layer)
    if config.arch == "mixtral" and f"{p}.block_sparse_moe.gate.weight" in present:
        return f"{p}.block_sparse_moe"
    return f"{p}.mlp"


def expert_layout(prefix: str, present: set[str]) -> str:
    if f"{prefix}.experts.gate_up_proj" in present:
        return "fused"
    if f"{prefix}.experts.0.w1.weight" in present:
        return "w123"
    return "proj"


def expected_moe_tensors(config: ModelConfig, layer: int, present) -> dict[str, tuple[int, ...]]:
    present = set(present)
    h, e, inter = config.hidden_size, config.num_experts, config.moe_intermediate_size
    prefix = moe_prefix(config, layer, present)
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}.gate.weight": (e, h)}
    layout = expert_layout(prefix, present)
    if layout == "fused":
        shapes[f"{prefix}.experts.gate_up_proj"] = (e, 2 * inter, h)
        shapes[f"{prefix}.experts.down_proj"] = (e, h, inter)
    else:
        gate, up, down = _PER_EXPERT[layout]
        for i in range(e):
            shapes[f"{prefix}.experts.{i}.{gate}.weight"] = (inter, h)
            shapes[f"{prefix}.experts.{i}.{up}.weight"] = (inter, h)
            shapes[f"{prefix}.experts.{i}.{down}.weight"] = (h, inter)
    shared = config.shared_expert_intermediate_size
    if config.arch == "qwen2_moe" and shared > 0:
        for name, shape in (("gate_proj", (shared, h)), ("up_proj", (shared, h)), ("down_proj", (h, shared))):
            shapes[f"{prefix}.shared_expert.{name}.weight"] = shape
        shapes[f"{prefix}.shared_expert_gate.weight"] = (1, h)
    return shapes


@dataclass
class MoEBlock:
    router: torch.Tensor                 # [E, H]
    experts: list[SwiGLU]
    top_k: int
    renormalize: bool
    shared: SwiGLU | None = None         # Qwen2-MoE shared expert
    shared_gate: torch.Tensor | None = None   # [1, H]

    @classmethod
    def from_weights(cls, config: ModelConfig, layer: int, weights: dict[str, torch.Tensor]) -> MoEBlock:
        present = set(weights)
        prefix = moe_prefix(config, layer, present)
        experts = _experts(prefix, expert_layout(prefix, present), config.num_experts, weights)
        block = cls(weights[f"{prefix}.gate.weight"], experts, config.num_experts_per_tok,
                    config.arch == "mixtral" or config.norm_topk_prob)
        if f"{prefix}.shared_expert_gate.weight" in weights:
            block.shared = SwiGLU.from_weights(f"{prefix}.shared_expert", weights)
            block.shared_gate = weights[f"{prefix}.shared_expert_gate.weight"]
        return block

    def __call__(self, x: torch.Tensor, linear) -> torch.Tensor:
        # x: [T, H] fp32 -> [T, H]
        out = self._routed(x, linear)
        if self.shared is not None:
            gate = torch.sigmoid(linear(x, self.shared_gate))         # [T, 1]
            out = out + gate * self.shared(x, linear)
        return out

    def _routed(self, x: torch.Tensor, linear) -> torch.Tensor:
        probs = torch.softmax(linear(x, self.router), dim=-1)         # [T, E]
        top_w, top_e = torch.topk(probs, self.top_k, dim=-1)           # [T, k]
        if self.renormalize:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if x.shape[0] == 1 and linear is kernels.linear:
            out = self._one_token(x, top_w[0], top_e[0].tolist())
            if out is not None:
                return out
        flat_e = top_e.reshape(-1)                                     # [T*k]
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=len(self.experts)).tolist()
        token_of = order // self.top_k                                 # token index per sorted slot
        weight_of = top_w.reshape(-1)[order]
        out = torch.zeros_like(x)
        begin = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[begin:begin + count]
            y = self.experts[expert_id](x[tokens].contiguous(), linear)   # [count, H]
            # index_put_ with accumulate, not index_add_: on CPU index_add_ opens a thread
            # pool region even for one row (~190 us vs 3.5 us with 2 threads)
            out.index_put_((tokens,), y * weight_of[begin:begin + count, None], accumulate=True)
            begin += count
        return out


    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: list[int]) -> torch.Tensor | None:
        """Decode of one token: each of the k experts' matrices in one grouped kernel call
        (a core per expert) instead of k calls in a row; None when the kernel can't take them.

        x [1, H], weights [k] -> [1, H].
        """
        experts = [self.experts[e] for e in expert_ids]
        k = len(experts)
        if all(e.gate_up is not None for e in experts):
            first = [e.gate_up for e in experts]                         # k x [2I, H]
        else:
            first = [e.gate for e in experts] + [e.up for e in experts]  # 2k x [I, H]
        downs = [e.down for e in experts]                                # k x [H, I]
        if not (kernels.can_group_m1(first) and kernels.can_group_m1(downs)):
            return None
        h = kernels.grouped_linear_m1(x.expand(len(first), -1), first)
        gate, up = h.chunk(2, dim=-1) if len(first) == k else (h[:k], h[k:])  # [k, I] each
        y = kernels.grouped_linear_m1(F.silu(gate) * up, downs)            # [k, H]
        return (weights[:, None].to(torch.float32) * y).sum(0, keepdim=True)


def _experts(prefix: str, layout: str, num_experts: int, weights) -> list[SwiGLU]:
    if layout == "fused":
        gate_up = weights[f"{prefix}.experts.gate_up_proj"]   # [E, 2I, H]
        down = weights[f"{prefix}.experts.down_proj"]         # [E, H, I]
        return [SwiGLU(None, None, gate_up[e], down[e]) for e in range(num_experts)]
    return [SwiGLU.from_weights(f"{prefix}.experts.{e}", weights, _PER_EXPERT[layout])
            for e in range(num_experts)]
