"""The host KV tier: a second, block-granular KV cache in host memory per model, and the
copies between it and the model's KV cache (DuplexKV in SuperInfer).

The tier is a host pool apart from the worker's KV budget: fresh anonymous pages, faulted
in only as blocks are written; pinned host memory when the model's KV cache is on a GPU
(today a GPU slice keeps its KV cache in host memory too, so the pool is the same).
Copies run asynchronously on two threads, one per direction, so a swap-out and a swap-in
run at once, and both overlap the engine's forward pass (torch releases the GIL while it
copies). A `Transfer` tells when its copy is complete: the scheduler frees a swapped-out
sequence's blocks, or runs a swapped-in one, only then (`worker/rotation.py`).

The tier holds `host_kv_bytes` per model (like `kv_cache_bytes`), allocated on a model's
first swap-out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.checkpoint import ModelConfig
from worker.model import KVCache, kv_bytes_per_token

logger = logging.getLogger(__name__)
OUT, IN = "out", "in"  # device -> host, host -> device


@dataclass(eq=False)
class Transfer:
    """One copy of KV blocks between the tiers; `is_done` once its bytes are all there."""

    num_bytes: int
    error: BaseException | None = None
    done_s: float = 0.0
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)


@dataclass
class _HostSlot:
    config: ModelConfig
    num_blocks: int
    kv: KVCache | None = None  # allocated on first use


class KVTier:
    def __init__(self, host_kv_bytes: int, block_size: int, device_kv: Callable[[str], KVCache],
                 kv_dtype: torch.dtype = torch.float32):
        self.host_kv_bytes = host_kv_bytes
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.device_kv = device_kv  # model id -> its (loaded) KV cache
        self.slots: dict[str, _HostSlot] = {}
        self.num_bytes_out = 0  # totals since start, counted when a copy completes
        self.num_bytes_in = 0
        self._queues: dict[str, queue.SimpleQueue] = {}

    def add_model(self, model_id: str, config: ModelConfig) -> int:
        """Know a model; returns how many KV blocks of it the tier holds."""
        num_blocks = self.host_kv_bytes // self.bytes_per_block(config)
        self.slots[model_id] = _HostSlot(config, num_blocks)
        return num_blocks

    def bytes_per_block(self, config: ModelConfig) -> int:
        return self.block_size * kv_bytes_per_token(config, self.kv_dtype)

    def start(self, model_id: str, direction: str, src_ids: list[int], dst_ids: list[int]) -> Transfer:
        """Queue a copy of blocks `src_ids` to `dst_ids` (same length): OUT from the model's
        KV cache to the tier, IN back. Returns at once."""
        slot = self.slots[model_id]
        device = self.device_kv(model_id)
        host = self._host_kv(slot, pinned=device.k.is_cuda)
        src, dst = (device, host) if direction == OUT else (host, device)
        transfer = Transfer(len(src_ids) * self.bytes_per_block(slot.config))
        self._queue(direction).put((transfer, direction, src, dst, src_ids, dst_ids))
        return transfer

    def _host_kv(self, slot: _HostSlot, pinned: bool) -> KVCache:
        if slot.kv is None:
            from worker.runner import zero_pages

            num_bytes = slot.num_blocks * self.bytes_per_block(slot.config)
            buffer = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True) if pinned else zero_pages(num_bytes)
            slot.kv = KVCache.allocate(slot.config, slot.num_blocks, self.block_size, self.kv_dtype, buffer=buffer)
        return slot.kv

    def _queue(self, direction: str) -> queue.SimpleQueue:
        if direction not in self._queues:  # each direction's thread starts with its first copy
            self._queues[direction] = queue.SimpleQueue()
            threading.Thread(target=self._copy_loop, args=(self._queues[direction],),
                             name=f"kv-swap-{direction}", daemon=True).start()
        return self._queues[direction]

    def _copy_loop(self, jobs: queue.SimpleQueue) -> None:
        while True:
            transfer, direction, src, dst, src_ids, dst_ids = jobs.get()
            try:
                _copy_blocks(src, dst, src_ids, dst_ids)
                if direction == OUT:
                    self.num_bytes_out += transfer.num_bytes
                else:
                    self.num_bytes_in += transfer.num_bytes
            except BaseException as exc:  # reported through the transfer; the thread goes on
                logger.exception("KV swap-%s of %d blocks failed", direction, len(src_ids))
                transfer.error = exc
            transfer.done_s = time.monotonic()
            transfer._done.set()


@torch.inference_mode()
def _copy_blocks(src: KVCache, dst: KVCache, src_ids: list[int], dst_ids: list[int]) -> None:
    # k, v: [L, num_blocks, block_size, H, D]; a block is one slice of dim 1 in every layer
    src_index = torch.tensor(src_ids, device=src.k.device)
    dst_index = torch.tensor(dst_ids, device=dst.k.device)
    for s, d in ((src.k, dst.k), (src.v, dst.v)):
        d.index_copy_(1, dst_index, s.index_select(1, src_index).to(d.device, non_blocking=False))


__all__ = ["IN", "OUT", "KVTier", "Transfer"]
