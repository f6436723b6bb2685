"""ModelRunner: the only part of the engine that touches tensors.

It owns, per model, the weights (zero-copy views from the host store, or a private copy
in "load" mode), one paged `KVCache` and the `CausalLM` over them; `run` turns a
`ScheduledBatch` into a `ForwardBatch`, runs the forward pass and samples.

Residency modes:
- "host": the model is made resident in the node's host store when added, and mapped
  (no copy) on its first request; it stays mapped.
- "load" (ServerlessLLM-style baseline): on a cold start the weights are copied from the
  checkpoint files into this process's memory; models no running request uses are
  evicted least-recently-used to stay under `load_budget_bytes`.

Quantized weights: `quantize="int8" | "q4"` (default from `C2C_QUANTIZE`, empty = none)
keeps the projection matrices as int8 per-channel (`c2c_kernels.cpu_int8`) or 4-bit
groups of 32 (`c2c_kernels.cpu_q4`): stored so in the host store (a copy of its own), or
quantized after loading in "load" mode. CPU only.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import c2c_kernels as kernels
from worker.checkpoint import ModelConfig, checkpoint_tensor_files
from worker.forward_batch import ForwardBatch
from worker.hoststore import QUANTIZE_MODES
from worker.layers import quantize_weights, with_quantized_weights
from worker.model import CausalLM, KVCache, kv_bytes_per_token
from worker.sampling import Sampler
from worker.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


@dataclass
class ModelSlot:
    model_id: str
    model_dir: Path
    config: ModelConfig
    num_blocks: int
    host_key: str | None = None
    model: CausalLM | None = None
    kv_buffer: torch.Tensor | None = None   # flat uint8 under kv, back to the pool on unload
    kv: KVCache | None = None
    resident: object | None = None          # hoststore.ResidentModel while mapped
    private_bytes: int = 0                  # "load": bytes copied into this process
    pipeline: object | None = None          # worker.pipeline.Pipeline: the model served in stages
    last_used_s: float = field(default_factory=time.monotonic)

    @property
    def is_loaded(self) -> bool:
        return self.model is not None


class ModelRunner:
    def __init__(self, block_size: int, kv_cache_bytes: int, residency: str = "host",
                 load_budget_bytes: int | None = None, host_store_root: str | None = None,
                 kv_dtype: torch.dtype = torch.float32, max_num_seqs: int = 16,
                 device: str = "cpu", device_cache_bytes: int = 0, quantize: str | None = None):
        if residency not in ("host", "load"):
            raise ValueError(f"residency must be 'host' or 'load', got {residency!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        # cuda (worker.device_runner's): weights stay in host memory, mapped into the GPU; a
        # DeviceTileCache of device_cache_bytes holds the cached fraction rho of them.
        self.weight_backend = None
        if device == "cuda":
            from c2c_kernels.cuda_backend import CudaWeightBackend

            self.weight_backend = CudaWeightBackend(device_cache_bytes)
        self.quantize = (os.environ.get("C2C_QUANTIZE", "") if quantize is None else quantize).strip() or None
        if self.quantize not in (None, *QUANTIZE_MODES) or (self.quantize and device != "cpu"):
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES} (CPU slices) or empty, "
                             f"got {self.quantize!r} on {device}")
        self.block_size = block_size
        self.kv_cache_bytes = kv_cache_bytes
        self.residency = residency
        self.load_budget_bytes = load_budget_bytes
        self.kv_dtype = kv_dtype
        self.max_num_seqs = max_num_seqs  # caps the KV cache at what that many full contexts use
        self.slots: dict[str, ModelSlot] = {}
        # KV memory is the slice's, not the model's: buffers outlive the models that used
        # them and go back to this pool on unload
        self._free_kv_buffers: list[torch.Tensor] = []
        self.sampler = Sampler()
        self._store = None
        self._host_store_root = host_store_root

    # -- models ---------------------------------------------------------------------
    def register(self, model_id: str, model_dir: Path, config: ModelConfig) -> int:
        """Know a model (host mode: make it resident in the host store); returns its KV blocks."""
        bytes_per_block = self.block_size * kv_bytes_per_token(config, self.kv_dtype)
        useful_blocks = -(-self.max_num_seqs * config.max_position_embeddings // self.block_size)
        num_blocks = max(1, min(self.kv_cache_bytes // bytes_per_block, useful_blocks))
        slot = ModelSlot(model_id, Path(model_dir), config, num_blocks)
        if self.residency == "host":
            slot.host_key = self.host_store.make_resident(model_dir, quantize=self.quantize)
        self.slots[model_id] = slot
        return num_blocks

    @property
    def host_store(self):
        if self._store is None:
            from worker.hoststore import HostStore

            self._store = HostStore(self._host_store_root)
        return self._store

    def ensure_loaded(self, model_id: str, is_busy) -> bool:
        """Map or load the model if it is not yet; True when this call did (a cold start)."""
        slot = self.slots[model_id]
        slot.last_used_s = time.monotonic()
        if slot.is_loaded:
            return False
        start_s = time.perf_counter()
        try:
            self._load(slot, is_busy)
        except BaseException:
            self.unload(model_id)  # leave nothing half-mapped; the next request retries
            raise
        logger.info("model %s %s in %.3f s", model_id,
                    "mapped" if self.residency == "host" else f"loaded ({slot.private_bytes} bytes)",
                    time.perf_counter() - start_s)
        return True

    def _load(self, slot: ModelSlot, is_busy) -> None:
        if self.residency == "host":
            slot.resident = self.host_store.open(slot.host_key)
            weights = with_quantized_weights(slot.resident.tensors())
        else:
            self._evict_for(slot.model_id, _files_bytes(slot.model_dir), is_busy)
            weights = _load_private(slot.model_dir)
            if self.quantize:
                weights = quantize_weights(weights, self.quantize)
            slot.private_bytes = sum(t.numel() * t.element_size() for w in weights.values()
                                     for t in (w.tensors() if isinstance(w, kernels.QUANTIZED) else (w,)))
        if self.quantize:
            kernels.warmup_quantized(self.quantize)
        need = slot.num_blocks * self.block_size * kv_bytes_per_token(slot.config, self.kv_dtype)
        slot.kv_buffer = self._take_kv_buffer(need)
        slot.kv = KVCache.allocate(slot.config, slot.num_blocks, self.block_size, self.kv_dtype,
                                   buffer=slot.kv_buffer)
        slot.model = CausalLM(slot.config, weights, linear=kernels.linear)

    def unload(self, model_id: str) -> None:
        """Drop the model's weights and KV cache (its sequences must hold no KV blocks)."""
        slot = self.slots[model_id]
        if slot.pipeline is not None:
            slot.pipeline.close()
        slot.model, slot.kv, slot.private_bytes, slot.pipeline = None, None, 0, None
        if slot.kv_buffer is not None:
            _release_pages(slot.kv_buffer)
            self._free_kv_buffers.append(slot.kv_buffer)
            slot.kv_buffer = None
        if self.weight_backend is not None:
            self.weight_backend.drop_model(model_id)
        if slot.resident is not None:
            slot.resident.close()
            slot.resident = None

    def _take_kv_buffer(self, need_bytes: int) -> torch.Tensor:
        for i, buffer in enumerate(self._free_kv_buffers):
            if buffer.numel() >= need_bytes:
                return self._free_kv_buffers.pop(i)
        return zero_pages(max(self.kv_cache_bytes, need_bytes))

    def warmup(self) -> None:
        """Put one KV buffer in the pool and load the kernels' compiled code before any request."""
        self._free_kv_buffers.append(self._take_kv_buffer(self.kv_cache_bytes))
        kernels.warmup()

    def set_rho(self, rho: float) -> float:
        """Fraction of weight bytes served from slice memory (cuda); CPU slices have none."""
        return self.weight_backend.set_rho(rho) if self.weight_backend is not None else 0.0

    def cached_fractions(self) -> dict[str, float]:
        """Per loaded model, the fraction of its weight bytes served from slice memory:
        the tile cache's achieved ρ on a GPU slice; 1.0 on a CPU slice, which has no
        device cache, so a mapped model is as warm as it gets."""
        loaded = [m for m, slot in self.slots.items() if slot.is_loaded]
        if self.weight_backend is None:
            return dict.fromkeys(loaded, 1.0)
        return {m: self.weight_backend.cached_fraction(m) for m in loaded}

    def loaded_bytes(self) -> int:
        return sum(s.private_bytes for s in self.slots.values())

    def _evict_for(self, model_id: str, need_bytes: int, is_busy) -> None:
        if self.load_budget_bytes is None:
            return
        idle = sorted((s for s in self.slots.values()
                       if s.is_loaded and s.model_id != model_id and not is_busy(s.model_id)),
                      key=lambda s: s.last_used_s)
        while idle and self.loaded_bytes() + need_bytes > self.load_budget_bytes:
            victim = idle.pop(0)
            logger.info("evicting model %s (%d bytes) to load %s", victim.model_id,
                        victim.private_bytes, model_id)
            self.unload(victim.model_id)
        if self.loaded_bytes() + need_bytes > self.load_budget_bytes:
            logger.warning("loading %s exceeds load_budget_bytes: every other model is in use", model_id)

    # -- live migration ---------------------------------------------------------------
    def kv_layout(self, model_id: str) -> list[int]:
        """[num_layers, block_size, num_kv_heads, head_dim, bytes per element]: what two
        workers must agree on to hand KV blocks over."""
        c = self.slots[model_id].config
        item = torch.empty((), dtype=self.kv_dtype).element_size()
        return [c.num_layers, self.block_size, c.num_kv_heads, c.head_dim, item]

    def export_kv(self, model_id: str, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of these KV blocks, in this order: K and V [L, n, block_size, Hkv, D]."""
        kv, index = self.slots[model_id].kv, torch.tensor(block_ids, dtype=torch.long)
        return kv.k.index_select(1, index), kv.v.index_select(1, index)

    def import_kv(self, model_id: str, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K and V [L, n, block_size, Hkv, D] into these blocks (another worker's export)."""
        kv, index = self.slots[model_id].kv, torch.tensor(block_ids, dtype=torch.long)
        kv.k.index_copy_(1, index, k)
        kv.v.index_copy_(1, index, v)

    # -- one step -------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | Exception]:
        """Forward the batch; returns one sampled token per sequence with a sample flag,
        or the exception of a sample that failed (`Sampler.sample`: that request alone)."""
        slot = self.slots[batch.model_id]
        seqs = batch.seqs
        forward_batch = ForwardBatch.of_scheduled(batch, self.block_size)
        sample_rows = [i for i, flag in enumerate(batch.sample_flags) if flag]
        if len(sample_rows) < len(seqs):  # mid-prefill chunks need no logits: skip their LM head rows
            forward_batch.logits_indices = forward_batch.logits_indices[sample_rows]
        if slot.pipeline is not None:  # layer ranges on several stages (worker/pipeline.py)
            logits = slot.pipeline.forward(forward_batch)
        else:
            logits = slot.model.forward(forward_batch, slot.kv)  # [S, vocab] fp32
        if not sample_rows:
            return []
        sampled = [seqs[i] for i in sample_rows]
        return self.sampler.sample(logits, [s.params for s in sampled], [s.request_id for s in sampled])


def zero_pages(num_bytes: int) -> torch.Tensor:
    """A flat uint8 buffer of fresh anonymous pages: zero by the OS, faulted in on first write.

    A cold start then costs nothing for its KV cache (torch.zeros of the default 256 MiB
    took 53 ms, most of a small model's first-request latency), and memory grows only with
    the KV blocks in use. Zero pages are finite, as KVCache wants of its buffer.
    """
    pages = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8)  # keeps `pages` alive


def _release_pages(buffer: torch.Tensor) -> None:
    """Give a `zero_pages` buffer's pages back to the OS (MADV_DONTNEED): a pooled KV
    buffer then holds no memory, and reads as zeros (finite) when a model takes it again."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(buffer.numel()), mmap.MADV_DONTNEED):
        logger.warning("madvise(MADV_DONTNEED) of a KV buffer failed: errno %d", ctypes.get_errno())


def _files_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_tensor_files(model_dir))


def _load_private(model_dir: Path) -> dict[str, torch.Tensor]:
    """Copy every tensor of the checkpoint into memory owned by this process."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_tensor_files(model_dir):
        # load_file hands back views of a private file mapping, read lazily on first touch;
        # the baseline pays the copy at the cold start, as ServerlessLLM does
        tensors.update((name, t.clone()) for name, t in load_file(str(file)).items())
    return tensors
