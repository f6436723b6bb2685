"""The rebalance plan and the migration target ranking (pure policies, plain records)."""

from placer.rebalance import Move, plan_moves
from services.schemas import WorkerInfo, WorkerState
from worker.migration_policy import rank_targets, transport_for


def state(worker_id, running=0, waiting=0, node="n1", kv_free=1.0, models=("m",), pinned=()):
    return WorkerState(worker_id, node=node, num_running=running, num_waiting=waiting, kv_free_frac=kv_free,
                       models=list(models), active_models=list(models) if running else [], pinned_models=list(pinned))


def test_a_hot_slice_hands_a_request_to_an_idle_one_on_its_node_first():
    views = [state("hot", running=4, waiting=2), state("far", node="n2"), state("near"), state("busy", running=1)]
    assert plan_moves(views) == [Move("hot", "near")]


def test_no_move_without_a_hot_and_an_idle_slice():
    assert plan_moves([state("a", running=4), state("b")]) == []  # nothing waits, KV not full
    assert plan_moves([state("a", running=4, waiting=3), state("b", running=1)]) == []  # nobody idle
    assert plan_moves([state("a", running=1, waiting=3), state("b")]) == []  # one request: nothing to split


def test_a_full_kv_cache_is_hot_too_and_each_idle_slice_takes_one():
    views = [state("a", running=3, kv_free=0.05), state("b", running=5, waiting=4), state("idle")]
    assert plan_moves(views) == [Move("b", "idle")]  # the most waiting first; the idle slice is taken once


def test_an_idle_slice_pinned_to_other_models_is_no_target():
    views = [state("hot", running=4, waiting=2), state("pinned", pinned=("other",)), state("any", node="n2")]
    assert plan_moves(views) == [Move("hot", "any")]


def test_targets_same_node_first_never_the_source_nor_pinned_elsewhere():
    workers = [WorkerInfo("src", node="n1"), WorkerInfo("far", node="n2"), WorkerInfo("near", node="n1"),
               WorkerInfo("pinned", node="n1", pinned_models=["other"])]
    assert [w.worker_id for w in rank_targets(workers, "m", "src", "n1")] == ["near", "far"]
    assert transport_for("", "n1", "n1") == "shm"
    assert transport_for("net", "n1", "n1") == "net"
    assert transport_for("shm", "n1", "n2") == "net"  # no shared memory across nodes
