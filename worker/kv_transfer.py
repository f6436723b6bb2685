"""How a migrating request's KV blocks travel: a shared memory file (two workers of one
node) or bytes in NATS messages (any two workers).

Both carry K and V as [num_layers, num_blocks, block_size, num_kv_heads, head_dim] in
the request's block-table order. Shared memory: the source writes the blocks into a file
under /dev/shm at their table positions and the target copies them into its own blocks
(the blocks are handed over, not recomputed); messages then carry only block ranges.
Network: the bytes go in `KVBlocks` messages of at most `blocks_per_message` blocks, each
under the server's max payload.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

_SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
_MESSAGE_OVERHEAD_BYTES = 64 * 1024  # the rest of a KVBlocks message, and NATS headers


def shm_path(migration_id: str) -> Path:
    return _SHM_DIR / f"c2c-kv-{migration_id}"


def block_shape(kv_layout: list[int]) -> tuple[int, int, int, int]:
    """[num_layers, block_size, num_kv_heads, head_dim] of one block of K (or V)."""
    num_layers, block_size, num_kv_heads, head_dim, _ = kv_layout
    return num_layers, block_size, num_kv_heads, head_dim


def block_bytes(kv_layout: list[int]) -> int:
    """Bytes of one block of K plus V."""
    return 2 * math.prod(block_shape(kv_layout)) * kv_layout[4]


def blocks_per_message(kv_layout: list[int], max_payload_bytes: int) -> int:
    """How many blocks one KVBlocks message may carry; ValueError if not even one fits."""
    num_blocks = (max_payload_bytes - _MESSAGE_OVERHEAD_BYTES) // block_bytes(kv_layout)
    if num_blocks < 1:
        raise ValueError(f"a KV block of {block_bytes(kv_layout)} bytes exceeds the bus's max payload "
                         f"of {max_payload_bytes} bytes")
    return num_blocks


def to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, kv_layout: list[int], dtype: torch.dtype) -> torch.Tensor:
    """K or V [L, n, block_size, Hkv, D] from a message's bytes (copied: the message is read-only)."""
    num_layers, block_size, num_kv_heads, head_dim = block_shape(kv_layout)
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    return flat.view(num_layers, -1, block_size, num_kv_heads, head_dim)


class ShmKV:
    """A shared memory file with room for `num_blocks` blocks of K and V.

    The source creates it (`create=True`, sparse: pages appear as blocks are written) and
    unlinks it when the migration ends; the target opens it by the migration's id.
    """

    def __init__(self, migration_id: str, kv_layout: list[int], num_blocks: int, dtype: torch.dtype,
                 create: bool):
        self.path = shm_path(migration_id)
        shape = (kv_layout[0], num_blocks, *block_shape(kv_layout)[1:])
        half_bytes = math.prod(shape) * kv_layout[4]
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, 2 * half_bytes)
            elif os.fstat(fd).st_size < 2 * half_bytes:
                raise ValueError(f"{self.path} holds fewer than the {num_blocks} blocks announced")
            self._map = mmap.mmap(fd, 2 * half_bytes)
        finally:
            os.close(fd)
        buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self.k, self.v = (buffer[i * half_bytes:(i + 1) * half_bytes].view(dtype).view(shape) for i in range(2))

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    def write(self, first_block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Blocks first_block.. of the table (K and V [L, n, ...])."""
        self.k[:, first_block:first_block + k.shape[1]] = k
        self.v[:, first_block:first_block + v.shape[1]] = v

    def read(self, first_block: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of blocks first_block.. of the table."""
        end = first_block + num_blocks
        if end > self.num_blocks:
            raise ValueError(f"blocks {first_block}..{end} are past the {self.num_blocks} of {self.path}")
        return self.k[:, first_block:end], self.v[:, first_block:end]

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)
