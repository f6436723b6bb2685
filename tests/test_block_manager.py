"""Paged KV block allocation (pure)."""

import pytest

from worker.block_manager import BlockManager, num_blocks_for
from worker.sequence import Sequence


def _seq(request_id="r"):
    return Sequence(request_id, "m", [1, 2, 3], 3, None, arrival_s=0.0)


def test_num_blocks_for_rounds_up():
    assert [num_blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_table_across_block_boundaries():
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = _seq()
    bm.allocate(seq, 3)
    assert len(seq.block_table) == 1 and bm.num_free_blocks == 4
    bm.append(seq, 4)  # still fits in block 0
    assert len(seq.block_table) == 1
    bm.append(seq, 5)  # crosses into a second block
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 3
    assert len(set(seq.block_table)) == 2


def test_can_allocate_and_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = _seq("a"), _seq("b")
    assert bm.can_allocate(a, 8)
    bm.allocate(a, 8)
    assert not bm.can_allocate(b, 1)
    with pytest.raises(MemoryError):
        bm.allocate(b, 1)
    assert bm.used_frac == 1.0


def test_free_returns_blocks_for_reuse():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = _seq("a"), _seq("b")
    bm.allocate(a, 6)
    used = list(a.block_table)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 3
    bm.allocate(b, 6)
    assert sorted(b.block_table) == sorted(used)


def test_rejects_empty_cache():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_fresh_blocks_go_out_in_ascending_order():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = _seq("a"), _seq("b")
    bm.allocate(a, 5)
    bm.allocate(b, 4)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4]


def test_the_last_freed_blocks_are_reused_first():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b, c = _seq("a"), _seq("b"), _seq("c")
    bm.allocate(a, 4)   # [0, 1]
    bm.allocate(b, 4)   # [2, 3]
    bm.free(a)
    bm.free(b)          # freed last: reused first, in its table's order
    bm.allocate(c, 8)
    assert c.block_table == [2, 3, 0, 1]


def test_sequential_requests_cycle_through_the_same_blocks():
    bm = BlockManager(num_blocks=1000, block_size=4)
    used = set()
    for i in range(200):  # one request at a time, growing token by token as in decode
        seq = _seq(f"r{i}")
        for num_tokens in range(1, 4 * (1 + i % 3) + 1):
            bm.append(seq, num_tokens)
        used.update(seq.block_table)
        bm.free(seq)
    assert used == {0, 1, 2}  # the largest request's need, not 200 requests' worth
