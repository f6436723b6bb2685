"""DeviceModelRunner: the model runner of a GPU slice (EngineConfig.device="cuda").

Same interface as `ModelRunner` (the engine, scheduler, block manager and sampler are
shared); everything but the streamed weights lives on the device (`worker.device_model`).
Per step, one packed int32 array goes to the device (token ids, positions, KV slots, block
tables, the rows to sample) and only the sampled ids come back; a batch with a request
that samples non-greedily, or whose logits a processor or logprobs need, brings back the
last-position logits rows instead and samples them on the host with the shared `Sampler`.
Every per-step transfer goes through `DeviceCopies`, which counts them.

Residency: "host" maps the host store's pages into the device (zero-copy) and caches the
fraction ρ of each matrix in the slice's tile cache; "load" copies the whole model into
device memory on a cold start (ρ = 1, every tile cached; the LRU budget of ModelRunner
applies). "dedicated" is "load" with the model preloaded and never evicted (the worker's).
The KV cache is per model in device memory; on a GPU with no configured tile-cache size
the cache takes the free memory KV does not need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda

from c2c_kernels.cuda_backend import HybridWeight
from c2c_kernels.cuda_kernels import IS_SIMULATOR
from worker.device_model import DeviceModel, pack_step
from worker.forward_batch import ForwardBatch
from worker.layers import without_fused_parts
from worker.runner import ModelRunner, ModelSlot, _files_bytes, _load_private
from worker.sampling import is_greedy_temperature, is_plain
from worker.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)
SIM_NUM_BLOCKS = 2        # HybridGEMM blocks per launch in the simulator (each thread is a Python thread)
SIM_DEVICE_BYTES = 64 << 20  # the simulator's tile cache (it has no device memory to measure)
FREE_MEMORY_MARGIN = 0.1  # of the device's free memory, left to the allocator and kernels


@dataclass
class DeviceCopies:
    """Host <-> device copies of the runner, counted (tests check what a step moves)."""

    num_to_device: int = 0
    bytes_to_device: int = 0
    num_to_host: int = 0
    bytes_to_host: int = 0

    def to_device(self, array: np.ndarray):
        self.num_to_device += 1
        self.bytes_to_device += array.nbytes
        return cuda.to_device(array)

    def to_host(self, device_array) -> np.ndarray:
        self.num_to_host += 1
        self.bytes_to_host += device_array.nbytes
        return device_array.copy_to_host()


def is_streamed_matrix(name: str, t: torch.Tensor) -> bool:
    """Every 2-D bf16 matrix, the embedding too (gathered from, and the tied LM head)."""
    return t.dim() == 2 and t.dtype == torch.bfloat16 and "norm" not in name


class DeviceModelRunner(ModelRunner):
    def __init__(self, block_size: int, kv_cache_bytes: int, residency: str = "host",
                 load_budget_bytes: int | None = None, host_store_root: str | None = None,
                 max_num_seqs: int = 16, device_cache_bytes: int = 0):
        cache_bytes = device_cache_bytes if device_cache_bytes > 0 else _free_device_bytes(kv_cache_bytes)
        super().__init__(block_size, kv_cache_bytes, residency, load_budget_bytes, host_store_root,
                         max_num_seqs=max_num_seqs, device="cuda", device_cache_bytes=cache_bytes)
        if IS_SIMULATOR:
            self.weight_backend.num_blocks = SIM_NUM_BLOCKS
        self.copies = DeviceCopies()

    def _load(self, slot: ModelSlot, is_busy) -> None:
        if self.residency == "host":
            slot.resident = self.host_store.open(slot.host_key)
            tensors = slot.resident.tensors()
            # register each byte once (fused matrices, not their parts); the parts' names
            # stay, unused, since they tell the expert layout
            weights = {**tensors, **self.weight_backend.wrap_weights(
                slot.model_id, without_fused_parts(tensors), is_streamed=is_streamed_matrix)}
        else:
            self._evict_for(slot.model_id, _files_bytes(slot.model_dir), is_busy)
            weights = copy_to_device(_load_private(slot.model_dir), self.weight_backend.num_blocks)
            slot.private_bytes = sum(w.nbytes for w in weights.values() if isinstance(w, HybridWeight))
        slot.model = DeviceModel(slot.config, weights, slot.num_blocks, self.block_size, self.copies.to_device)

    def warmup(self) -> None:
        """Compile the kernels before the first request (numba compiles at a kernel's first
        launch: seconds a cold start would otherwise pay). Nothing to do in the simulator."""
        if not IS_SIMULATOR:
            compile_kernels(self.block_size)

    def cached_fractions(self) -> dict[str, float]:
        if self.residency == "load":
            return {m: 1.0 for m, slot in self.slots.items() if slot.is_loaded}
        return super().cached_fractions()

    # -- one step -------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | Exception]:
        """Forward the batch on the device; one sampled token (or a failed sample's
        exception) per sequence with a sample flag."""
        slot, seqs = self.slots[batch.model_id], batch.seqs
        forward_batch = ForwardBatch.of_scheduled(batch, self.block_size)
        sample_rows = [i for i, flag in enumerate(batch.sample_flags) if flag]
        packed, layout = pack_step(forward_batch, sample_rows)
        logits = slot.model.forward(self.copies.to_device(packed), layout)   # [R, V] on the device
        if not sample_rows:
            return []
        sampled = [seqs[i] for i in sample_rows]
        if all(is_greedy_temperature(s.params.temperature) and is_plain(s.params) for s in sampled):
            return self.copies.to_host(slot.model.argmax(logits)).tolist()
        rows = torch.from_numpy(self.copies.to_host(logits))                 # [R, V] f32
        return self.sampler.sample(rows, [s.params for s in sampled], [s.request_id for s in sampled])


def copy_to_device(weights: dict, num_blocks: int | None = None) -> dict:
    """"load": every matrix wholly in device memory, outside the tile cache (ρ stays 1)."""
    out = {}
    for name, t in weights.items():
        if is_streamed_matrix(name, t):
            w = HybridWeight(t, name=name, is_mapped=False)
            w.num_blocks = num_blocks
            w.set_cached_rows(w.shape[0])
            t = w
        out[name] = t
    return out


def compile_kernels(block_size: int) -> None:
    """A prefill (weight-stationary HybridGEMM) and a decode step (output-stationary) of a
    made-up micro Qwen2-MoE (q|k|v bias, routed and shared experts, a dense layer): every
    kernel of the device engine runs once, with the argument types a real model's have."""
    import tempfile

    import c2c_kernels as kernels
    from worker.checkpoint import load_config
    from worker.synth import synth_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = synth_model("qwen2_moe", "micro", tmp)
        weights = copy_to_device(_load_private(model_dir), SIM_NUM_BLOCKS if IS_SIMULATOR else None)
        config = load_config(model_dir)
    num_prefill = kernels.decode_threshold() + 1
    num_blocks = -(-(num_prefill + 1) // block_size)
    model = DeviceModel(config, weights, num_blocks, block_size, cuda.to_device)
    for tokens, num_cached in ((list(range(num_prefill)), 0), ([1], num_prefill)):
        batch = ForwardBatch.build([tokens], [num_cached], [list(range(num_blocks))], block_size)
        packed, layout = pack_step(batch, [0])
        model.argmax(model.forward(cuda.to_device(packed), layout)).copy_to_host()


def _free_device_bytes(kv_cache_bytes: int) -> int:
    """Tile-cache bytes on a GPU with none configured: free memory less KV and a margin."""
    if IS_SIMULATOR:
        return SIM_DEVICE_BYTES
    free_bytes, _ = cuda.current_context().get_memory_info()
    return max(0, int(free_bytes * (1 - FREE_MEMORY_MARGIN)) - kv_cache_bytes)
