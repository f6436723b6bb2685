"""Pipeline-parallel serving in one process: layer splits, micro-batches, frames, stages
giving the one-stage tokens (dense and MoE), online reconfiguration mid-stream."""

import pytest
import torch
from pipeline_helpers import deep_tiny, make_engine, run_streams, switch_now

from placer.pipeline_policy import split_layers
from services.stage_wire import StageCall
from worker.forward_batch import ForwardBatch
from worker.pipeline import StageSpec, micro_batches, specs_for
from worker.stage_frames import batch_of_call, decode_frame, encode_frame, forward_call, split_parts


def test_split_layers_in_proportion_to_speed():
    assert split_layers(4, [1.0]) == [(0, 4)]
    assert split_layers(4, [1.0, 1.0]) == [(0, 2), (2, 4)]
    assert split_layers(24, [3.0, 1.0]) == [(0, 18), (18, 24)]      # heterogeneous: unequal
    assert split_layers(3, [100.0, 1.0, 1.0]) == [(0, 1), (1, 2), (2, 3)]  # at least a layer each
    with pytest.raises(ValueError):
        split_layers(2, [1.0, 1.0, 1.0])
    specs = specs_for(4, [1.0, 1.0], [("driver", ""), ("remote", "s1")])
    assert specs == [StageSpec(0, 2), StageSpec(2, 4, "remote", "s1")]


def _batch():
    return ForwardBatch.build([[1, 2, 3, 4, 5], [6], [7, 8], [9]], [0, 3, 1, 7],
                              [[0, 1], [2], [3], [4, 5]], 4)


def test_micro_batches_cut_whole_sequences_in_order():
    batch = _batch()
    parts = micro_batches(batch, 2)
    assert [p.query_lens for p in parts] == [[5], [1, 2, 1]]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert torch.equal(torch.cat([p.slot_mapping for p in parts]), batch.slot_mapping)
    assert [p.logits_indices.tolist() for p in parts] == [[4], [0, 2, 3]]
    assert len(micro_batches(batch, 9)) == 4 and micro_batches(batch, 1) == [batch]


def test_frames_round_trip_in_parts():
    batch = _batch()
    x = torch.randn(batch.num_tokens, 64)
    call, tensors = forward_call("slot", batch, x)
    tensors["bf16"], tensors["empty"] = torch.randn(3, 5).bfloat16(), torch.empty(0, 7)
    frame = encode_frame(call, tensors)
    parts = split_parts(frame, 100)
    assert len(parts) > 1
    header, back = decode_frame(StageCall, bytearray(b"".join(bytes(p) for p in parts)))
    got_batch, got_x = batch_of_call(header, back)
    assert torch.equal(got_x, x) and torch.equal(back["bf16"], tensors["bf16"]) and back["empty"].shape == (0, 7)
    assert got_batch.block_tables == batch.block_tables and torch.equal(got_batch.positions, batch.positions)


@pytest.fixture(scope="module", params=["qwen2", "qwen2_moe"])
def deep_model(request, tmp_path_factory):
    return deep_tiny(tmp_path_factory.mktemp(f"deep-{request.param}"), request.param)


@pytest.fixture(scope="module")
def one_stage_tokens(deep_model):
    return run_streams(make_engine(deep_model))


@pytest.mark.parametrize("specs", [
    [StageSpec(0, 2), StageSpec(2, 4, "local")],
    [StageSpec(0, 1), StageSpec(1, 3, "local"), StageSpec(3, 4, "local")],
    [StageSpec(0, 3), StageSpec(3, 4)],
], ids=["2-stages", "3-stages", "2-driver-stages"])
def test_stages_give_the_one_stage_tokens(deep_model, one_stage_tokens, specs):
    engine = make_engine(deep_model)
    switch_now(engine, specs)
    assert engine.runner.slots["m"].pipeline.specs == specs
    assert run_streams(engine) == one_stage_tokens


def test_reconfiguration_mid_stream_keeps_every_stream_exact(deep_model, one_stage_tokens):
    """1 -> 2 -> 3 -> 1 stages while 8 streams decode: each switch copies the moved layers' KV."""
    plans = {3: [StageSpec(0, 2), StageSpec(2, 4, "local")],
             9: [StageSpec(0, 1), StageSpec(1, 2, "local"), StageSpec(2, 4, "local")],
             15: [StageSpec(0, 4)]}
    switches = []

    def at_step(engine, n):
        for switch in switches:  # each switch done within a few steps, before the next one
            switch.wait_ready(60)
        if n in plans:
            switches.append(engine.reconfigure("m", plans[n]))

    engine = make_engine(deep_model)
    assert run_streams(engine, at_step=at_step) == one_stage_tokens
    assert len(switches) == 3 and all(s.error is None and s.new is not None for s in switches)
    assert engine.runner.slots["m"].pipeline.specs == plans[15]
