"""KV rotation in the engine (tiny checkpoint, real copies between the KV cache and the
host tier): greedy outputs equal those of requests run alone, rotations really happen
both ways, and every block of both tiers is free again at the end.

Time is a step counter (the scheduler's clock advances a fixed amount per reading), so
the SLO slack the policy sees does not depend on how busy this machine is.
"""

import pytest

from worker.engine import Engine, EngineConfig, SamplingParams
from worker.model import kv_bytes_per_token

LONG = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
DECODE_PROMPTS = ["one two three four five six", "the quick brown fox jumps"]
LATE_PROMPTS = ["hello there general kenobi you are a bold one", "a b c d e f g h i j k l m n o"]
# Token counts: decodes 15 and 18 prompt tokens + 20 (end at 9 + 10 blocks of 4 slots);
# late prompts 27 and 17 + 6. At step 12 the decodes hold 7 + 8 of 20 blocks, so the
# first late prompt (7 blocks) cannot start, and waiting 8 more decode steps (4 clock
# readings of 0.01 s each) would miss its 0.2 s TTFT SLO.
LATE_STEP = 12
LATE_TTFT_SLO_S = 0.2
NUM_BLOCKS = 20


class StepClock:
    """A clock that moves `tick_s` each time it is read."""

    def __init__(self, tick_s: float = 0.01):
        self.now_s, self.tick_s = 0.0, tick_s

    def __call__(self) -> float:
        self.now_s += self.tick_s
        return self.now_s


@pytest.fixture(scope="module")
def qwen(tiny_model):
    return tiny_model("qwen2")


def make_engine(model_dir, num_blocks: int | None = None, host_kv_bytes: int = 1 << 20) -> Engine:
    config = EngineConfig(residency="load", block_size=4, num_threads=1, host_kv_bytes=host_kv_bytes)
    if num_blocks is not None:
        probe = Engine(EngineConfig(residency="load", host_kv_bytes=0))
        probe.add_model("q", model_dir)
        config.kv_cache_bytes = num_blocks * 4 * kv_bytes_per_token(probe.runner.slots["q"].config)
    engine = Engine(config)
    engine.add_model("q", model_dir)
    engine.scheduler.clock = StepClock()
    return engine


def run_burst(engine: Engine) -> dict[str, list[int]]:
    """Two long decodes, then, once they decode, two prompts with a tight TTFT SLO."""
    clock = engine.scheduler.clock
    for i, prompt in enumerate(DECODE_PROMPTS):
        engine.add_request(f"d{i}", "q", prompt=prompt, params=LONG, arrival_s=clock.now_s,
                           ttft_slo_s=5.0, tpot_slo_s=1.0)
    tokens = {f"d{i}": [] for i in range(len(DECODE_PROMPTS))}
    num_steps = 0
    while engine.has_work():
        if num_steps == LATE_STEP:
            for i, prompt in enumerate(LATE_PROMPTS):
                engine.add_request(f"l{i}", "q", prompt=prompt, params=SHORT, arrival_s=clock.now_s,
                                   ttft_slo_s=LATE_TTFT_SLO_S, tpot_slo_s=1.0)
                tokens[f"l{i}"] = []
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.new_token_ids
        num_steps += 1
    return tokens


@pytest.fixture(scope="module")
def alone(qwen):
    engine = make_engine(qwen, host_kv_bytes=0)
    return {p: engine.generate("q", p, params).new_token_ids
            for p, params in [(p, LONG) for p in DECODE_PROMPTS] + [(p, SHORT) for p in LATE_PROMPTS]}


def _expected(alone) -> dict[str, list[int]]:
    return ({f"d{i}": alone[p] for i, p in enumerate(DECODE_PROMPTS)}
            | {f"l{i}": alone[p] for i, p in enumerate(LATE_PROMPTS)})


def _assert_all_free(engine: Engine) -> None:
    for bm in engine.scheduler.block_managers.values():
        assert bm.num_free_blocks == bm.num_blocks and not any(bm.num_holders)
    for bm in engine.scheduler.rotator.host_block_managers.values():
        assert bm.num_free_blocks == bm.num_blocks and not any(bm.num_holders)
    assert not engine.scheduler.rotator.rotations


def test_rotation_keeps_greedy_outputs_and_frees_every_block(qwen, alone):
    engine = make_engine(qwen, num_blocks=NUM_BLOCKS)
    assert run_burst(engine) == _expected(alone)
    stats = engine.stats()
    assert stats.num_swaps_out > 0 and stats.num_swaps_in == stats.num_swaps_out
    assert stats.swap_out_bytes == stats.swap_in_bytes > 0
    assert stats.kv_device_blocks_used == 0 and stats.kv_host_blocks_used == 0
    _assert_all_free(engine)


def test_without_host_tier_the_late_prompts_wait(qwen, alone):
    engine = make_engine(qwen, num_blocks=NUM_BLOCKS, host_kv_bytes=0)
    assert run_burst(engine) == _expected(alone)
    assert engine.scheduler.rotator is None and engine.stats().num_swaps_out == 0


def test_abort_while_rotated_frees_both_tiers(qwen):
    engine = make_engine(qwen, num_blocks=NUM_BLOCKS)
    clock = engine.scheduler.clock
    for i, prompt in enumerate(DECODE_PROMPTS):
        engine.add_request(f"d{i}", "q", prompt=prompt, params=LONG, arrival_s=clock.now_s,
                           ttft_slo_s=5.0, tpot_slo_s=1.0)
    for _ in range(LATE_STEP):
        engine.step()
    for i, prompt in enumerate(LATE_PROMPTS):
        engine.add_request(f"l{i}", "q", prompt=prompt, params=SHORT, arrival_s=clock.now_s, ttft_slo_s=LATE_TTFT_SLO_S)
    num_steps = 0
    while not engine.scheduler.rotator.rotations:
        engine.step()
        num_steps += 1
        assert num_steps < 200, "no rotation happened"
    for seq in list(engine.scheduler.rotator.seqs()):
        engine.abort(seq.request_id)
    while engine.has_work():
        engine.step()
    _assert_all_free(engine)


def test_a_sequence_that_cannot_grow_rotates_another_out_instead_of_recomputing(qwen):
    # 12 blocks of 4 slots: the two decodes end at 9 + 10 blocks
    prompts = DECODE_PROMPTS + LATE_PROMPTS[1:]
    reference = make_engine(qwen, host_kv_bytes=0)
    alone = {p: reference.generate("q", p, LONG).new_token_ids for p in prompts}
    engine = make_engine(qwen, num_blocks=12)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", "q", prompt=prompt, params=LONG, arrival_s=engine.scheduler.clock.now_s)
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens == {f"r{i}": alone[p] for i, p in enumerate(prompts)}
    stats = engine.stats()
    assert stats.num_swaps_out > 0 and stats.num_preemptions == 0
    _assert_all_free(engine)


def test_a_drain_brings_rotated_requests_back_in_and_they_become_movable(qwen, alone):
    from worker import handover
    from worker.migration import _bring_in, _is_back_in

    engine = make_engine(qwen, num_blocks=NUM_BLOCKS)
    clock = engine.scheduler.clock
    tokens = {}
    for i, prompt in enumerate(DECODE_PROMPTS):
        engine.add_request(f"d{i}", "q", prompt=prompt, params=LONG, arrival_s=clock.now_s,
                           ttft_slo_s=5.0, tpot_slo_s=1.0)
        tokens[f"d{i}"] = []
    for i in range(len(LATE_PROMPTS)):
        tokens[f"l{i}"] = []

    def step():
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.new_token_ids

    for _ in range(LATE_STEP):
        step()
    for i, prompt in enumerate(LATE_PROMPTS):
        engine.add_request(f"l{i}", "q", prompt=prompt, params=SHORT, arrival_s=clock.now_s,
                           ttft_slo_s=LATE_TTFT_SLO_S, tpot_slo_s=1.0)
    num_steps = 0
    while not engine.scheduler.rotator.rotations:
        step()
        num_steps += 1
        assert num_steps < 200, "no rotation happened"
    rotated = _bring_in(engine, list(tokens))
    assert rotated
    for request_id in rotated:
        while not _is_back_in(engine, request_id):
            step()
            num_steps += 1
            assert num_steps < 400, f"{request_id} never came back in"
        if not engine._requests[request_id].seq.is_finished:
            handover.check_movable(engine, request_id)
    while engine.has_work():
        step()
    assert tokens == _expected(alone)
    _assert_all_free(engine)
