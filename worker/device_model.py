"""The decoder-only model's forward pass on device arrays (the "cuda" model runner's).

Everything a step computes stays on the device: the residual stream, the paged KV cache,
attention, norms, RoPE, MoE routing, the LM head and the greedy argmax. Weights are
`HybridWeight`s (HybridGEMM reads the cached rows from device memory and the rest from
mapped host memory); norms and biases are small fp32 device copies made at load. The
step's integer inputs arrive as one packed int32 device array (`pack_step`).

Architectures: what `worker.model` builds from a checkpoint (Llama, Qwen2 with q|k|v
bias, Mistral's sliding window, Mixtral and Qwen2-MoE). MoE runs each expert over the
whole batch and adds each token's routed share (weight 0 elsewhere), with no host round
trip to learn which experts were picked: in decode (output-stationary GEMMs) a device-side
count switches off the experts no token was routed to, so their weights are not read; a
prefill chunk (weight-stationary) runs them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda

from c2c_kernels import cuda_ops
from c2c_kernels.cuda_backend import HybridWeight
from worker.checkpoint import ModelConfig
from worker.forward_batch import ForwardBatch
from worker.layers import EMBED, FINAL_NORM, LM_HEAD, SwiGLU, rope_inv_freq
from worker.model import decoder_layer


@dataclass
class StepLayout:
    """Where each part of the packed step array starts (int32 elements)."""

    num_tokens: int
    num_seqs: int
    num_sampled: int
    max_blocks: int

    def part(self, packed, index: int):
        t, s, r = self.num_tokens, self.num_seqs, self.num_sampled
        starts = (0, t, 2 * t, 3 * t, 4 * t, 4 * t + r, 4 * t + r + s * self.max_blocks)
        return packed[starts[index]:starts[index + 1]]

    def ids(self, packed):          # [T] token ids
        return self.part(packed, 0)

    def positions(self, packed):    # [T]
        return self.part(packed, 1)

    def slots(self, packed):        # [T] KV slot of each new token
        return self.part(packed, 2)

    def seq_of(self, packed):       # [T] the sequence each token belongs to
        return self.part(packed, 3)

    def sample_rows(self, packed):  # [R] tokens whose logits are sampled
        return self.part(packed, 4)

    def tables(self, packed):       # [S, max_blocks] block tables, padded with 0
        return self.part(packed, 5).reshape(self.num_seqs, self.max_blocks)


def pack_step(batch: ForwardBatch, sample_rows: list[int]) -> tuple[np.ndarray, StepLayout]:
    """One int32 array holding everything a step sends to the device (see StepLayout)."""
    max_blocks = max(len(t) for t in batch.block_tables)
    tables = np.zeros((len(batch.block_tables), max_blocks), dtype=np.int32)
    for i, table in enumerate(batch.block_tables):
        tables[i, :len(table)] = table
    seq_of = np.repeat(np.arange(len(batch.query_lens), dtype=np.int32), batch.query_lens)
    rows = batch.logits_indices.numpy()[sample_rows]
    packed = np.concatenate([batch.input_ids.numpy(), batch.positions.numpy(), batch.slot_mapping.numpy(),
                             seq_of, rows, tables.reshape(-1)]).astype(np.int32)
    return packed, StepLayout(batch.num_tokens, len(batch.query_lens), len(sample_rows), max_blocks)


class Workspace:
    """Activation buffers reused across steps (allocating per step would cost a cudaMalloc each)."""

    def __init__(self):
        self._buffers: dict[tuple[str, int], object] = {}

    def get(self, name: str, rows: int, cols: int, dtype=np.float32):
        key = (name, cols)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < rows:
            buffer = cuda.device_array((max(rows, 1), cols), dtype=dtype)
            if dtype == np.float32:  # finite from the start: a skipped expert's buffers are read
                cuda_ops.launch("fill", cuda_ops.grid_for(buffer.size), buffer, np.float32(0.0))
            self._buffers[key] = buffer
        return buffer[:rows]


@dataclass
class DeviceMLP:
    gate_up: list[HybridWeight]     # [gate|up] fused, or [gate, up]
    down: HybridWeight              # [H, I]

    @classmethod
    def of(cls, mlp: SwiGLU) -> DeviceMLP:
        return cls([mlp.gate_up] if mlp.gate_up is not None else [mlp.gate, mlp.up], mlp.down)


@dataclass
class DeviceMoE:
    router: HybridWeight            # [E, H]
    experts: list[DeviceMLP]
    top_k: int
    renormalize: bool
    shared: DeviceMLP | None
    shared_gate: HybridWeight | None   # [1, H]


@dataclass
class DeviceLayer:
    input_norm: object              # [H] f32 device arrays
    post_norm: object
    qkv: list[HybridWeight]         # [q|k|v] fused, or [q, k, v]
    qkv_bias: list                  # device arrays or None, one per qkv entry
    o: HybridWeight
    o_bias: object
    mlp: DeviceMLP | None
    moe: DeviceMoE | None


class DeviceModel:
    """forward(packed, layout) -> [R, vocab] f32 device logits of the sampled rows."""

    def __init__(self, config: ModelConfig, weights: dict, num_blocks: int, block_size: int, to_device):
        """weights: checkpoint names -> HybridWeight (every matrix) or torch tensor (norms,
        biases); to_device copies a host array to the device (the runner's, counted)."""
        for name in ("hidden_size", "intermediate_size", "head_dim"):
            if getattr(config, name) % 4:
                raise ValueError(f"the device engine needs {name} % 4 == 0, got {getattr(config, name)}")
        self.config = config
        self.block_size = block_size
        self._to_device = lambda t: None if t is None else to_device(t.float().contiguous().numpy())
        self.embed = _hybrid(weights[EMBED], EMBED)
        self.lm_head = self.embed if config.tie_word_embeddings else _hybrid(weights[LM_HEAD], LM_HEAD)
        self.final_norm = self._to_device(weights[FINAL_NORM])
        self.layers = [self._layer(i, weights) for i in range(config.num_layers)]
        # [max_pos, D/2] rotary tables, computed as worker.layers.rope_cos_sin does
        freqs = torch.arange(config.max_position_embeddings).float()[:, None] * rope_inv_freq(config)[None, :]
        self.cos, self.sin = self._to_device(freqs.cos()), self._to_device(freqs.sin())
        num_slots = num_blocks * block_size
        # never read before written (attention reads only this sequence's earlier slots)
        shape = (config.num_layers, num_slots, config.num_kv_heads, config.head_dim)
        self.k_cache = cuda.device_array(shape, dtype=np.float32)
        self.v_cache = cuda.device_array(shape, dtype=np.float32)
        self.workspace = Workspace()

    def _layer(self, i: int, weights: dict) -> DeviceLayer:
        layer = decoder_layer(self.config, i, weights)
        attn, dev = layer.attn, self._to_device
        mlp = DeviceMLP.of(layer.mlp) if layer.mlp is not None else None
        moe = None
        if layer.moe is not None:
            m = layer.moe
            moe = DeviceMoE(m.router, [DeviceMLP.of(e) for e in m.experts], m.top_k, m.renormalize,
                            DeviceMLP.of(m.shared) if m.shared is not None else None, m.shared_gate)
        layer_weights = [*attn.qkv, attn.o, *(w for x in (mlp, moe) if x is not None for w in _matrices(x))]
        for w in layer_weights:
            _hybrid(w, f"layer {i}")
        return DeviceLayer(dev(layer.input_norm), dev(layer.post_norm), attn.qkv,
                           [dev(b) for b in attn.qkv_bias], attn.o, dev(attn.o_bias), mlp, moe)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_cache.size * 4

    # -- one step ---------------------------------------------------------------------
    def forward(self, packed, layout: StepLayout):
        cfg, ws, n = self.config, self.workspace, layout.num_tokens
        x = ws.get("x", n, cfg.hidden_size)                        # [T, H] residual stream
        h = ws.get("h", n, cfg.hidden_size)                        # [T, H] normed
        delta = ws.get("delta", n, cfg.hidden_size)                # [T, H] a block's output
        w_dev, w_host = self.embed.parts()
        cuda_ops.launch("embed", n, layout.ids(packed), w_dev, w_host, self.embed.n_dev, x)
        eps = np.float32(cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            cuda_ops.launch("add_rms_norm", n, x, delta, i > 0, layer.input_norm, eps, h)
            self._attention(h, layer, i, packed, layout, delta)
            cuda_ops.launch("add_rms_norm", n, x, delta, True, layer.post_norm, eps, h)
            self._mlp(h, layer, delta)
        cuda_ops.launch("add_rms_norm", n, x, delta, True, self.final_norm, eps, h)
        last = ws.get("last", layout.num_sampled, cfg.hidden_size)  # [R, H]
        logits = ws.get("logits", layout.num_sampled, cfg.vocab_size)  # [R, V]
        if layout.num_sampled:
            cuda_ops.launch("gather_rows", layout.num_sampled, h, layout.sample_rows(packed), last)
            self.lm_head.matmul_device(last, logits)
        return logits

    def argmax(self, logits):
        """[R, V] device logits -> [R] int32 device ids."""
        ids = self.workspace.get("ids", 1, logits.shape[0], dtype=np.int32)[0]
        if logits.shape[0]:
            cuda_ops.launch("argmax", logits.shape[0], logits, ids)
        return ids

    def _attention(self, h, layer: DeviceLayer, i: int, packed, layout: StepLayout, out) -> None:
        cfg, ws, n = self.config, self.workspace, layout.num_tokens
        dim, q_cols = cfg.head_dim, cfg.num_heads * cfg.head_dim
        qkv = ws.get("qkv", n, q_cols + 2 * cfg.num_kv_heads * dim)     # [T, (nH + 2 nKV) D]
        _linear(layer.qkv, layer.qkv_bias, h, qkv)
        cuda_ops.launch("rope_kv_write", n, qkv, layout.positions(packed), layout.slots(packed), self.cos,
                        self.sin, cfg.num_heads, cfg.num_kv_heads, self.k_cache, self.v_cache, i)
        attn = ws.get("attn", n, q_cols)                                 # [T, nH D]
        cuda_ops.launch("attention", (n, cfg.num_heads), qkv, self.k_cache, self.v_cache, i,
                        layout.positions(packed), layout.seq_of(packed), layout.tables(packed),
                        self.block_size, cfg.num_heads, cfg.sliding_window or 0,
                        np.float32(dim ** -0.5), attn, dims_per_thread=cuda_ops.attention_dims_per_thread(dim))
        _linear([layer.o], [layer.o_bias], attn, out)

    def _mlp(self, h, layer: DeviceLayer, out) -> None:
        if layer.mlp is not None:
            self._swiglu(layer.mlp, h, out)
            return
        moe, ws, n = layer.moe, self.workspace, h.shape[0]
        router = ws.get("router", n, moe.router.shape[0])               # [T, E]
        moe.router.matmul_device(h, router)
        routed = ws.get("routed", n, moe.router.shape[0])               # [T, E] weights, 0 = not picked
        counts = ws.get("expert_counts", 1, moe.router.shape[0])        # [1, E] tokens per expert
        cuda_ops.launch("fill", 1, counts, np.float32(0.0))
        cuda_ops.launch("moe_route", cuda_ops.grid_for(n), router, moe.top_k, moe.renormalize, routed, counts)
        cuda_ops.launch("fill", cuda_ops.grid_for(out.size), out, np.float32(0.0))
        y = ws.get("expert_out", n, out.shape[1])                       # [T, H]
        for e, expert in enumerate(moe.experts):
            self._swiglu(expert, h, y, gate=(counts, e))   # decode: an expert with no token reads nothing
            cuda_ops.launch("add_weighted", cuda_ops.grid_for(y.size), out, y, routed, e)
        if moe.shared is not None:
            self._swiglu(moe.shared, h, y)
            gate = ws.get("shared_gate", n, 1)                          # [T, 1]
            moe.shared_gate.matmul_device(h, gate)
            cuda_ops.launch("add_sigmoid_gated", cuda_ops.grid_for(y.size), out, y, gate)

    def _swiglu(self, mlp: DeviceMLP, h, out, gate=None) -> None:
        ws, n, inter = self.workspace, h.shape[0], mlp.down.shape[1]
        gate_up = ws.get("gate_up", n, 2 * inter)                       # [T, 2I]
        _linear(mlp.gate_up, [None] * len(mlp.gate_up), h, gate_up, gate)
        act = ws.get("act", n, inter)                                   # [T, I]
        cuda_ops.launch("silu_mul", cuda_ops.grid_for(act.size), gate_up, act)
        mlp.down.matmul_device(act, out, gate)


def _linear(matrices: list[HybridWeight], biases: list, x, out, gate=None) -> None:
    """out = x @ [W_0 | W_1 | ...].T (+ biases): each matrix fills its own column range."""
    col = 0
    for w, bias in zip(matrices, biases, strict=True):
        part = out[:, col:col + w.shape[0]]
        w.matmul_device(x, part, gate)
        if bias is not None:
            cuda_ops.launch("add_bias", cuda_ops.grid_for(part.size), part, bias)
        col += w.shape[0]


def _matrices(block):
    if isinstance(block, DeviceMLP):
        yield from (*block.gate_up, block.down)
        return
    yield block.router
    for mlp in [*block.experts, *([block.shared] if block.shared else [])]:
        yield from _matrices(mlp)
    if block.shared_gate is not None:
        yield block.shared_gate


def _hybrid(w, name: str) -> HybridWeight:
    if not isinstance(w, HybridWeight):
        raise ValueError(f"the device engine needs bf16 matrices; {name} is {getattr(w, 'dtype', type(w))}")
    return w
