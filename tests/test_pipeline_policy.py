"""The pipeline configuration policy (pure): grow on a backlog onto the fastest idle
slice, shrink when it is gone, hysteresis, splits in proportion to slice speeds."""

from placer.pipeline_policy import PipelinePlan, PipelinePolicy, plan_pipeline, whole
from services.schemas import WorkerState

POLICY = PipelinePolicy(grow_backlog_s=0.5, shrink_backlog_s=0.05, cooldown_s=2.0)


def state(worker_id, queued=0, running=0, waiting=0, speed=100.0, stopping=False):
    return WorkerState(worker_id, queued_prefill_tokens=queued, num_running=running, num_waiting=waiting,
                       prefill_tokens_per_s=speed, is_stopping=stopping)


def test_a_backlog_grows_onto_the_fastest_idle_slice_with_a_speed_split():
    driver = state("d", queued=200, running=8, waiting=4)
    others = [state("busy", running=1, speed=900.0), state("slow", speed=50.0), state("fast", speed=300.0),
              state("leaving", speed=900.0, stopping=True)]
    plan = plan_pipeline(24, driver, others, whole("d", 24), now_s=10.0, last_change_s=0.0, policy=POLICY)
    assert plan == PipelinePlan(("d", "fast"), ((0, 6), (6, 24)))   # 100 : 300 tokens/s


def test_hysteresis_and_shrink():
    grown = PipelinePlan(("d", "fast"), ((0, 12), (12, 24)))
    others = [state("fast")]
    busy = state("d", queued=1000, running=8, waiting=8)
    quiet = state("d", queued=0, running=2)
    assert plan_pipeline(24, quiet, others, grown, now_s=1.0, last_change_s=0.0, policy=POLICY) == grown  # cooldown
    assert plan_pipeline(24, busy, [], grown, now_s=9.0, last_change_s=0.0, policy=POLICY) == grown  # no free slice
    assert plan_pipeline(24, state("d", queued=30), others, grown, 9.0, 0.0, POLICY) == grown  # between thresholds
    assert plan_pipeline(24, quiet, others, grown, now_s=9.0, last_change_s=0.0, policy=POLICY) == whole("d", 24)


def test_light_load_stays_whole():
    plan = whole("d", 4)
    assert plan_pipeline(4, state("d", queued=10, running=1), [state("x")], plan, 9.0, 0.0, POLICY) == plan


def test_measured_rates_steer_the_stage_count():
    driver = state("d", queued=5000, running=8, waiting=8)
    two = PipelinePlan(("d", "x"), ((0, 12), (12, 24)))
    others = [state("x"), state("y")]
    assert plan_pipeline(24, driver, others, whole("d", 24), 9.0, 0.0, POLICY, {}) == whole("d", 24)  # measure first
    much_slower = {1: 1000.0, 2: 600.0}
    assert plan_pipeline(24, driver, others, two, 9.0, 0.0, POLICY, much_slower) == whole("d", 24)  # back
    assert plan_pipeline(24, driver, others, whole("d", 24), 9.0, 0.0, POLICY, much_slower) == whole("d", 24)
    a_dip = {1: 1000.0, 2: 800.0}   # within max_loss of the best: one count further may pay
    assert plan_pipeline(24, driver, others, two, 9.0, 0.0, POLICY, a_dip).layer_ranges == ((0, 8), (8, 16), (16, 24))
    past_the_dip = {1: 1000.0, 2: 800.0, 3: 2500.0}
    assert plan_pipeline(24, driver, others, whole("d", 24), 9.0, 0.0, POLICY, past_the_dip) == two  # toward 3


def test_the_simulator_spreads_a_burst_of_a_big_model_and_backs_off_a_small_one():
    from sim.pipeline_burst import BurstConfig, compare

    big = compare(BurstConfig(family="dense-70b", profile="2g.24gb", num_requests=32))
    assert big["policy"]["ttft_p99_s"] < big["pinned"]["ttft_p99_s"]
    assert max(n for _, n in big["policy"]["changes"]) > 2 and big["policy"]["changes"][-1][1] == 1
    small = compare(BurstConfig(family="dense-1b"))
    assert max(n for _, n in small["policy"]["changes"]) < 8   # measured: more stages did not pay
