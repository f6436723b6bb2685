"""Continuous batching scheduler (pure): budgets, chunking, preemption, several models."""

import itertools

from worker.scheduler import Scheduler, SchedulerConfig
from worker.sequence import Sequence, SequenceStatus


class Clock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self):
        return self.now_s


def _make(config=None, models=(("m", 64, 4),)):
    clock = Clock()
    sched = Scheduler(config or SchedulerConfig(), clock=clock)
    for model_id, num_blocks, block_size in models:
        sched.add_model(model_id, num_blocks, block_size)
    return sched, clock


def _seq(request_id, prompt_len, model_id="m", arrival_s=100.0):
    # a prompt of its own: sequences with a common prefix share its KV blocks (test_prefix_sharing.py)
    start = 1 + 10_000 * next(_prompt_counter)
    return Sequence(request_id, model_id, list(range(start, start + prompt_len)), prompt_len, None, arrival_s)


_prompt_counter = itertools.count()


def _run_step(sched, next_token=7):
    batch = sched.schedule()
    assert batch is not None
    sched.postprocess(batch, [next_token] * batch.num_sampled)
    return batch


def test_prefill_then_decode_in_one_batch():
    sched, _ = _make()
    a = _seq("a", 5)
    sched.add(a)
    batch = _run_step(sched)
    assert batch.num_new_tokens == [5] and batch.sample_flags == [True]
    assert a.num_computed_tokens == 5 and a.token_ids[-1] == 7
    b = _seq("b", 3)
    sched.add(b)
    batch = _run_step(sched)
    assert {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)} == {"a": 1, "b": 3}


def test_chunked_prefill_respects_chunk_size_and_budget():
    sched, _ = _make(SchedulerConfig(max_num_batched_tokens=6, chunk_size=4))
    a, b = _seq("a", 10), _seq("b", 10, arrival_s=100.5)
    sched.add(a)
    sched.add(b)
    batch = _run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [4, 2] and batch.sample_flags == [False, False]
    assert batch.num_tokens <= 6
    for _ in range(10):
        if a.num_generated:
            break
        _run_step(sched)
    assert a.num_computed_tokens == 10 and a.num_generated == 1


def test_max_num_seqs_caps_the_batch():
    sched, _ = _make(SchedulerConfig(max_num_seqs=2))
    for i in range(4):
        sched.add(_seq(f"r{i}", 2, arrival_s=100 + i))
    batch = _run_step(sched)
    assert len(batch.seqs) == 2
    assert len(sched.waiting) == 2


def test_preemption_frees_blocks_and_recomputes():
    # 4 blocks of 2 slots: two sequences of 3 tokens fit (2 blocks each), then decode runs out.
    sched, _ = _make(models=(("m", 4, 2),))
    a, b = _seq("a", 3), _seq("b", 3, arrival_s=100.1)
    sched.add(a)
    sched.add(b)
    _run_step(sched)  # prefill: 3 slots each, 2 blocks each → all 4 used
    _run_step(sched)  # decode writes slot 3: still in the second block
    _run_step(sched)  # decode writes slot 4: needs a third block → the later one is preempted
    assert b.num_preemptions == 1 and b.status == SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert a.num_generated == 3 and b.num_generated == 2
    sched.finish(a, "length")
    batch = _run_step(sched)
    assert batch.seqs == [b] and batch.num_new_tokens == [5]  # prompt + its generated tokens
    assert batch.sample_flags == [True] and b.num_generated == 3


def test_finish_frees_blocks():
    sched, _ = _make()
    a = _seq("a", 5)
    sched.add(a)
    _run_step(sched)
    sched.finish(a, "stop")
    assert not sched.has_work() and sched.block_managers["m"].num_free_blocks == 64
    assert a.is_finished and a.finish_reason == "stop"


def test_one_model_per_step_and_every_model_served():
    sched, clock = _make(models=(("x", 64, 4), ("y", 64, 4)))
    sched.add(_seq("x1", 4, "x", arrival_s=100.0))
    sched.add(_seq("y1", 4, "y", arrival_s=100.2))
    served = []
    for _ in range(6):
        batch = _run_step(sched)
        assert len({s.model_id for s in batch.seqs}) == 1
        served.append(batch.model_id)
        clock.now_s += 0.3
    assert served[0] == "x" and "y" in served


def test_waiting_ordered_by_deadline():
    sched, _ = _make(SchedulerConfig(max_num_seqs=1))
    late, early = _seq("late", 2, arrival_s=105.0), _seq("early", 2, arrival_s=101.0)
    sched.add(late)
    sched.add(early)
    assert _run_step(sched).seqs == [early]


def test_queued_prefill_tokens_count_prompts_not_yet_in_the_kv_cache():
    sched, _ = _make(SchedulerConfig(max_num_batched_tokens=8, chunk_size=8))
    a, b = _seq("a", 12), _seq("b", 5)
    sched.add(a)
    sched.add(b)
    assert sched.num_queued_prefill_tokens() == 17
    _run_step(sched)  # 8 of a's prompt
    assert sched.num_queued_prefill_tokens() == 9
    _run_step(sched)
    _run_step(sched)
    assert sched.num_queued_prefill_tokens() == 0  # both decode now: one token each is decode work
