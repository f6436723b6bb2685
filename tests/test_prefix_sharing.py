"""KV blocks of a common prefix shared between live sequences (the n samples of a request):
the block manager counts holders, the scheduler hands a waiting sequence a running
sibling's computed full blocks, and greedy outputs stay exactly those of a lone request."""

from __future__ import annotations

from worker.block_manager import BlockManager
from worker.scheduler import Scheduler, SchedulerConfig
from worker.sequence import Sequence

BLOCK_SIZE = 4


def _seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, "m", list(tokens), len(tokens), None, arrival_s=0.0)


def test_a_shared_block_is_free_only_when_its_last_holder_frees_it():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    a, b = _seq("a", [1] * 8), _seq("b", [1] * 8)
    bm.allocate(a, 8)
    bm.share(b, a.block_table[:2])
    assert bm.num_free_blocks == 2 and b.block_table == a.block_table
    bm.free(a)
    assert bm.num_free_blocks == 2  # b still holds both
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.used_frac == 0.0


def _step(scheduler: Scheduler, next_token: int = 7):
    batch = scheduler.schedule()
    scheduler.postprocess(batch, [next_token] * batch.num_sampled)
    return batch


def test_siblings_wait_for_the_first_prefill_then_share_its_full_blocks():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, chunk_size=64))
    scheduler.add_model("m", num_blocks=32, block_size=BLOCK_SIZE)
    prompt = list(range(1, 11))  # 10 tokens: two full blocks and a partial one
    seqs = [_seq(f"s{i}", prompt) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    first = _step(scheduler)
    assert first.seqs == [seqs[0]] and first.num_new_tokens == [10]  # the others wait for its prefix
    second = _step(scheduler)
    by_id = dict(zip((s.request_id for s in second.seqs), second.num_new_tokens, strict=True))
    assert by_id == {"s0": 1, "s1": 2, "s2": 2}  # the siblings compute only past the shared 8 tokens
    for sibling in seqs[1:]:
        assert sibling.block_table[:2] == seqs[0].block_table[:2]
        assert sibling.block_table[2] != seqs[0].block_table[2]
    assert scheduler.num_shared_prefix_tokens == 16
    for seq in seqs:
        scheduler.finish(seq, "stop")
    assert scheduler.block_managers["m"].used_frac == 0.0


def test_a_sibling_that_cannot_start_holds_no_blocks():
    """Out of KV: the waiting sibling gives the shared blocks back (a waiting sequence holds
    no KV: its model may be unloaded meanwhile)."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, chunk_size=64))
    scheduler.add_model("m", num_blocks=3, block_size=BLOCK_SIZE)
    prompt = list(range(1, 11))
    a, b = _seq("a", prompt), _seq("b", prompt)
    scheduler.add(a)
    scheduler.add(b)
    _step(scheduler)  # a prefills (3 blocks: the whole cache)
    batch = _step(scheduler)
    assert batch.seqs == [a] and b in scheduler.waiting
    assert b.block_table == [] and b.num_computed_tokens == 0 and scheduler.num_shared_prefix_tokens == 0
    scheduler.finish(a, "stop")
    assert scheduler.block_managers["m"].used_frac == 0.0


def test_a_different_prompt_shares_nothing_and_does_not_wait():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, chunk_size=64))
    scheduler.add_model("m", num_blocks=32, block_size=BLOCK_SIZE)
    a, b = _seq("a", list(range(1, 11))), _seq("b", [9] + list(range(2, 11)))
    scheduler.add(a)
    scheduler.add(b)
    batch = _step(scheduler)
    assert batch.seqs == [a, b] and not set(a.block_table) & set(b.block_table)


def test_n_identical_greedy_requests_equal_one_and_compute_the_prompt_once(tiny_model):
    from worker.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(block_size=16))
    engine.add_model("m", tiny_model("llama"))
    prompt = "a long shared prompt " * 6
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = engine.generate("m", prompt, params).new_token_ids
    num_prompt = len(engine.tokenize_request("m", prompt=prompt))
    before = engine.stats().num_prefill_tokens
    for i in range(3):
        engine.add_request(f"r{i}", "m", prompt=prompt, params=params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens == {f"r{i}": alone for i in range(3)}
    num_shared = (num_prompt - 1) // 16 * 16
    assert engine.stats().num_prefill_tokens - before == 3 * num_prompt - 2 * num_shared
    assert engine.stats().kv_used_frac == 0.0
