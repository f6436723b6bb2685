"""Fair sharing between tenants on one slice: the pure policy and the scheduler using it."""

from __future__ import annotations

from worker.scheduler import Scheduler, SchedulerConfig
from worker.sequence import Sequence
from worker.step_policy import (
    SeqView,
    fair_order,
    num_running_by_tenant,
    order_by_deadline,
    pick_victim,
)


def waiting(rid: str, tenant: str, arrival_s: float) -> SeqView:
    return SeqView(rid, "m", arrival_s, True, 0, None, tenant=tenant)


def ids(views) -> list[str]:
    return [v.request_id for v in views]


def test_one_tenant_or_none_is_deadline_order():
    seqs = [waiting("c", "", 3.0), waiting("a", "", 1.0), waiting("b", "", 2.0)]
    assert ids(fair_order(seqs, {})) == ids(order_by_deadline(seqs)) == ["a", "b", "c"]
    assert ids(fair_order(seqs, {"": 5})) == ["a", "b", "c"]


def test_a_burst_does_not_go_before_the_other_tenant():
    burst = [waiting(f"a{i}", "A", float(i)) for i in range(30)]
    late = [waiting("b0", "B", 100.0), waiting("b1", "B", 101.0)]
    order = ids(fair_order(burst + late, {"A": 4}))  # A already runs 4
    assert order[:2] == ["b0", "b1"]  # B runs nothing: its requests get the next free slots
    assert order[2:] == [f"a{i}" for i in range(30)]


def test_interleaves_by_running_count_and_weight():
    seqs = [waiting(f"a{i}", "A", float(i)) for i in range(4)] + [waiting(f"b{i}", "B", 10.0 + i) for i in range(4)]
    assert ids(fair_order(seqs, {})) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
    # B weighs twice as much: two of B's per one of A's
    assert ids(fair_order(seqs, {}, {"B": 2.0}))[:6] == ["a0", "b0", "b1", "a1", "b2", "b3"]


def test_victim_comes_from_the_tenant_holding_the_most():
    running = [waiting("a0", "A", 0.0), waiting("a1", "A", 1.0), waiting("a2", "A", 2.0), waiting("b0", "B", 9.0)]
    counts = num_running_by_tenant(running)
    assert counts == {"A": 3, "B": 1}
    assert pick_victim(running, counts).request_id == "a2"  # not b0, though its deadline is the latest
    assert pick_victim(running, {}).request_id == "b0"  # one queue: the latest deadline


def _seq(rid: str, tenant: str, arrival_s: float) -> Sequence:
    seq = Sequence(rid, "m", [1, 2, 3, 4], 4, None, arrival_s)
    seq.tenant = tenant
    return seq


def _finish_one(sched: Scheduler, tenant: str) -> None:
    seq = next(s for s in sched.running if s.tenant == tenant)
    sched.finish(seq, "stop")


def test_scheduler_admits_the_other_tenant_before_the_burst_drains():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, chunk_size=256), clock=lambda: 200.0)
    sched.add_model("m", num_blocks=1024, block_size=16)
    for i in range(30):
        sched.add(_seq(f"a{i}", "A", float(i)))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a0", "a1", "a2", "a3"]
    sched.postprocess(batch, [7] * batch.num_sampled)
    sched.add(_seq("b0", "B", 100.0))
    sched.add(_seq("b1", "B", 101.0))
    _finish_one(sched, "A")  # one slot frees: B takes it, though A's 26 arrived first
    batch = sched.schedule()
    assert "b0" in [s.request_id for s in batch.seqs]
    sched.postprocess(batch, [7] * batch.num_sampled)
    _finish_one(sched, "A")
    batch = sched.schedule()
    assert "b1" in [s.request_id for s in batch.seqs]
    assert sum(1 for s in sched.waiting if s.tenant == "A") == 26  # none of A's backlog went first


def test_scheduler_without_tenants_keeps_deadline_order():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), clock=lambda: 200.0)
    sched.add_model("m", num_blocks=1024, block_size=16)
    for rid, arrival_s in (("x", 3.0), ("y", 1.0), ("z", 2.0)):
        sched.add(_seq(rid, "", arrival_s))
    assert [s.request_id for s in sched.schedule().seqs] == ["y", "z"]
