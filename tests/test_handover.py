"""Live migration at the engine level: a decoding request leaves one engine with its KV
(through shared memory or message bytes) and another engine continues it with exactly the
tokens and text an unmigrated run produces (greedy and seeded); a failed handover puts it
back; blocks are never leaked."""

import uuid

import pytest

from worker import handover, kv_transfer
from worker.engine import Engine, EngineConfig, SamplingParams

PROMPT = "the quick brown fox jumps over the lazy dog and then some more words follow here"
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=1.0, seed=1234, ignore_eos=True)


def make_engine(model_dir):
    engine = Engine(EngineConfig(residency="load", block_size=4, kv_cache_bytes=1 << 20, num_threads=1))
    engine.add_model("m", model_dir)
    return engine


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=3)


def run_until(engine, request_id, num_tokens, collected):
    """Step until the request has num_tokens generated (or finished); collect its outputs."""
    while engine.has_work():
        for out in engine.step():
            if out.request_id == request_id:
                collected[0] += out.new_token_ids
                collected[1] += out.new_text
        seq = engine.scheduler.find(request_id)
        if seq is None or seq.num_generated >= num_tokens:
            return


def move(source, target, request_id, transport):
    """The whole handover, with the KV through `transport` ("shm" or "net")."""
    migration_id = uuid.uuid4().hex[:12]
    layout = source.runner.kv_layout("m")
    seq = source.scheduler.find(request_id)
    reservation = handover.reserve(target, migration_id, "m", seq.num_computed_tokens, layout)
    state, parked = handover.detach(source, request_id)
    block_ids = handover.computed_block_ids(parked.seq, 4, full_only=False)
    k, v = source.runner.export_kv("m", block_ids)
    handover.grow(target, reservation, len(state.token_ids) - 1)
    target_ids = reservation.block_table[: len(block_ids)]
    if transport == "shm":
        shm = kv_transfer.ShmKV(migration_id, layout, len(block_ids), source.runner.kv_dtype, create=True)
        try:
            shm.write(0, k, v)
            opened = kv_transfer.ShmKV(migration_id, layout, len(block_ids), target.runner.kv_dtype, create=False)
            target.runner.import_kv("m", target_ids, *opened.read(0, len(block_ids)))
        finally:
            shm.unlink()
    else:
        k2, v2 = (kv_transfer.from_bytes(kv_transfer.to_bytes(t), layout, target.runner.kv_dtype) for t in (k, v))
        target.runner.import_kv("m", target_ids, k2, v2)
    handover.attach(target, state, reservation)
    handover.release(source, parked)


@pytest.mark.parametrize("transport", ["shm", "net"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_moved_request_continues_exactly(model_dir, transport, params):
    reference = make_engine(model_dir).generate("m", PROMPT, params)
    source, target = make_engine(model_dir), make_engine(model_dir)
    source.add_request("r", "m", prompt=PROMPT, params=params)
    collected = [[], ""]
    run_until(source, "r", 13, collected)  # mid-block (block_size 4): a partial tail block moves too
    move(source, target, "r", transport)
    assert not source.has_work()
    assert source.scheduler.block_managers["m"].num_free_blocks == source.scheduler.block_managers["m"].num_blocks
    run_until(target, "r", params.max_tokens + 1, collected)
    assert collected[0] == reference.new_token_ids
    assert collected[1] == reference.new_text
    bm = target.scheduler.block_managers["m"]
    assert bm.num_free_blocks == bm.num_blocks  # finished: every block back


def test_failed_handover_puts_the_request_back(model_dir):
    reference = make_engine(model_dir).generate("m", PROMPT, GREEDY)
    source, target = make_engine(model_dir), make_engine(model_dir)
    source.add_request("r", "m", prompt=PROMPT, params=GREEDY)
    collected = [[], ""]
    run_until(source, "r", 5, collected)
    seq = source.scheduler.find("r")
    reservation = handover.reserve(target, "x", "m", seq.num_computed_tokens, source.runner.kv_layout("m"))
    _, parked = handover.detach(source, "r")
    handover.cancel(target, reservation)  # the target gave up: its blocks go back
    handover.reattach(source, parked)
    run_until(source, "r", GREEDY.max_tokens + 1, collected)
    assert collected[0] == reference.new_token_ids
    for engine in (source, target):
        bm = engine.scheduler.block_managers["m"]
        assert bm.num_free_blocks == bm.num_blocks


def test_only_decoding_requests_move(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("r", "m", prompt=PROMPT, params=GREEDY)
    with pytest.raises(handover.HandoverError):
        handover.detach(engine, "r")  # waiting, no KV yet
    with pytest.raises(handover.HandoverError):
        handover.detach(engine, "nope")
    with pytest.raises(handover.HandoverError):
        handover.reserve(engine, "x", "m", 16, [1, 2, 3, 4, 5])  # another KV layout
