"""Paged KV block allocation for one model's KV cache (pure: no torch).

The cache holds `num_blocks` blocks of `block_size` token slots. A sequence owns the
blocks listed in its `block_table`, in order; token position p lives in block
`block_table[p // block_size]` at offset `p % block_size`. Full blocks of a common prefix
may be shared between live sequences (`share`: the scheduler hands a sequence the blocks of
a sibling with the same prompt, e.g. the n samples of one request); a block counts its
holders and goes back to the free stack when the last one frees it. A shared block is
never written again: every holder writes only past the shared prefix.

Free blocks are a stack (last in, first out): the block freed last is reused first, and
blocks never used go out in ascending order. The cache's memory is fresh anonymous pages
faulted in on first write, so a worker touches only as many blocks as its largest
concurrent need, however many requests pass through (first-in-first-out reuse walked
every block of the cache, so every page of it ended up resident).
"""

from __future__ import annotations

from typing import Protocol


class HasBlockTable(Protocol):
    block_table: list[int]


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() -> 0, 1, ...
        self.num_holders: list[int] = [0] * num_blocks  # sequences whose table lists the block

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def used_frac(self) -> float:
        return 1.0 - len(self.free_block_ids) / self.num_blocks

    def num_missing_blocks(self, seq: HasBlockTable, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its table covers `num_tokens` slots."""
        return max(0, num_blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: HasBlockTable, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_tokens) <= len(self.free_block_ids)

    def allocate(self, seq: HasBlockTable, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` slots; raises MemoryError if it can't."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > len(self.free_block_ids):
            raise MemoryError(f"need {missing} KV blocks, {len(self.free_block_ids)} free")
        for _ in range(missing):
            block_id = self.free_block_ids.pop()
            self.num_holders[block_id] = 1
            seq.block_table.append(block_id)

    def share(self, seq: HasBlockTable, block_ids: list[int]) -> None:
        """Give `seq` (holding no blocks) these blocks of another sequence: its first
        len(block_ids) blocks, already computed."""
        if seq.block_table:
            raise ValueError("share() needs a sequence that holds no blocks")
        for block_id in block_ids:
            self.num_holders[block_id] += 1
        seq.block_table.extend(block_ids)

    def can_append(self, seq: HasBlockTable, num_tokens: int) -> bool:
        """Can one more token (the `num_tokens`-th slot) be stored? Decode's check."""
        return self.can_allocate(seq, num_tokens)

    def append(self, seq: HasBlockTable, num_tokens: int) -> None:
        self.allocate(seq, num_tokens)

    def free(self, seq: HasBlockTable) -> None:
        """Give back all of `seq`'s blocks (finish or preemption); those nobody else holds
        are the next reused, in the table's order."""
        for block_id in reversed(seq.block_table):
            self.num_holders[block_id] -= 1
            if self.num_holders[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table.clear()
