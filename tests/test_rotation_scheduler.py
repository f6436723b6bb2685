"""KV rotation in the scheduler (pure: a fake copier whose copies complete when told):
swap-outs free blocks only once complete, a rotated sequence comes back with its KV,
recompute is the fallback when the host tier is full or a copy fails, and no block of
either tier leaks."""

from types import SimpleNamespace

from worker.rotation import Rotator
from worker.scheduler import Scheduler
from worker.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 4


class Clock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self):
        return self.now_s


class FakeTransfer:
    def __init__(self):
        self.error, self.is_done = None, False

    def wait(self, timeout_s=None):
        return self.is_done


class FakeCopier:
    def __init__(self):
        self.started: list[tuple[str, list[int], list[int], FakeTransfer]] = []

    def start(self, model_id, direction, src_ids, dst_ids):
        transfer = FakeTransfer()
        self.started.append((direction, list(src_ids), list(dst_ids), transfer))
        return transfer

    def complete_all(self, error=None):
        for *_, transfer in self.started:
            transfer.error, transfer.is_done = error, True


def _make(num_blocks=8, num_host_blocks=16):
    clock, copier = Clock(), FakeCopier()
    sched = Scheduler(clock=clock)
    sched.add_model("m", num_blocks, BLOCK_SIZE)
    sched.rotator = Rotator(copier)
    sched.rotator.add_model("m", num_host_blocks, BLOCK_SIZE)
    sched.step_s = 0.01
    return sched, clock, copier


def _seq(request_id, num_prompt, clock, ttft_slo_s=5.0, tpot_slo_s=1.0, start=1):
    tokens = list(range(start, start + num_prompt))
    return Sequence(request_id, "m", tokens, num_prompt, SimpleNamespace(max_tokens=100), clock.now_s,
                    ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)


def _step(sched, clock):
    clock.now_s += 0.01
    batch = sched.schedule()
    if batch is not None:
        sched.postprocess(batch, [7] * batch.num_sampled)
    return batch


def _two_decodes(sched, clock):
    """Two decodes of 3 blocks each (10 of their tokens in the KV): 2 of 8 blocks free."""
    a, b = _seq("a", 6, clock), _seq("b", 6, clock, start=100)
    sched.add(a)
    sched.add(b)
    for _ in range(5):
        _step(sched, clock)
    assert a.num_computed_tokens == b.num_computed_tokens == 10 and len(a.block_table) == len(b.block_table) == 3
    return a, b


def _urgent_arrival(sched, clock):
    w = _seq("w", 12, clock, ttft_slo_s=0.5, start=200)  # needs 4 blocks; the decodes end in ~1 s
    sched.add(w)
    return w


def _assert_no_blocks_held(sched):
    for bm in [*sched.block_managers.values(), *sched.rotator.host_block_managers.values()]:
        assert bm.num_free_blocks == bm.num_blocks and not any(bm.num_holders)


def test_a_request_at_risk_starts_once_a_decode_rotated_out():
    sched, clock, copier = _make()
    a, b = _two_decodes(sched, clock)
    w = _urgent_arrival(sched, clock)
    batch = _step(sched, clock)
    (direction, src_ids, host_ids, _), = copier.started
    victim = a if a.status == SequenceStatus.ROTATING_OUT else b
    assert direction == "out" and src_ids == victim.block_table and len(host_ids) == 3
    assert victim not in batch.seqs and w.status == SequenceStatus.WAITING  # blocks not free before the copy is
    assert victim.num_preemptions == 1 and sched.num_preemptions == 0  # its blocks go (a live migration's
    # pre-copy of them is stale), its KV stays
    _step(sched, clock)
    assert w.status == SequenceStatus.WAITING and victim.block_table == src_ids
    copier.complete_all()
    batch = _step(sched, clock)
    assert victim.status == SequenceStatus.ROTATED_OUT and not victim.block_table
    assert w in batch.seqs and sched.rotator.num_swaps_out == 1


def test_a_rotated_sequence_comes_back_with_its_kv_once_blocks_are_free():
    sched, clock, copier = _make()
    a, b = _two_decodes(sched, clock)
    w = _urgent_arrival(sched, clock)
    _step(sched, clock)
    copier.complete_all()
    _step(sched, clock)
    victim = a if a.status == SequenceStatus.ROTATED_OUT else b
    num_computed = victim.num_computed_tokens
    sched.finish(w, "length")  # its blocks are free, nobody waits: the victim need not wait for its slack to end
    _step(sched, clock)
    assert victim.status == SequenceStatus.ROTATING_IN
    direction, host_ids, dst_ids, _ = copier.started[-1]
    assert direction == "in" and dst_ids == victim.block_table and len(host_ids) == 3
    copier.complete_all()
    batch = _step(sched, clock)
    assert victim in batch.seqs and victim.num_computed_tokens == num_computed + 1  # decoding on, no recompute
    assert sched.rotator.num_swaps_in == 1 and sched.num_preemptions == 0
    for seq in (a, b):
        sched.finish(seq, "length")
    _assert_no_blocks_held(sched)


def test_recompute_when_the_host_tier_cannot_hold_a_victim():
    sched, clock, copier = _make(num_host_blocks=2)  # a decode holds 3
    a, b = _two_decodes(sched, clock)
    _urgent_arrival(sched, clock)
    _step(sched, clock)
    assert not copier.started and sched.rotator.num_recomputes == 1
    victim = a if a.status == SequenceStatus.WAITING else b
    assert victim.num_computed_tokens == 0 and not victim.block_table


def test_a_failed_copy_falls_back_to_recompute_and_frees_both_tiers():
    sched, clock, copier = _make()
    a, b = _two_decodes(sched, clock)
    _urgent_arrival(sched, clock)
    _step(sched, clock)
    copier.complete_all(error=OSError("copy failed"))
    _step(sched, clock)
    victim = a if a.num_preemptions else b
    assert victim.status in (SequenceStatus.WAITING, SequenceStatus.RUNNING) and sched.rotator.num_recomputes == 1
    assert not sched.rotator.rotations and sched.rotator.num_host_blocks_used() == 0


def test_abort_of_a_rotated_sequence_frees_both_tiers():
    sched, clock, copier = _make()
    a, b = _two_decodes(sched, clock)
    w = _urgent_arrival(sched, clock)
    _step(sched, clock)
    (*_, transfer), = copier.started
    transfer.is_done = True  # the copy completes; the abort comes before the next step
    for seq in (a, b, w):
        sched.finish(seq, "abort")
    assert not sched.has_work()
    _assert_no_blocks_held(sched)


def test_without_a_host_tier_the_policy_preempts_by_recompute():
    sched, clock, copier = _make()
    sched.rotator = Rotator(copier=None)  # the policy alone (bench rotate's recompute_slo)
    a, b = _two_decodes(sched, clock)
    w = _urgent_arrival(sched, clock)
    batch = _step(sched, clock)
    assert sched.num_preemptions == 1 and w in batch.seqs and not copier.started
