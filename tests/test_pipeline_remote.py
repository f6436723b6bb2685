"""Pipeline stages in stage server processes over a real NATS: the one-stage tokens, an
online switch 1 -> 2 -> 1 stages mid-stream, and a stage that dies (the engine serves the
model whole again and recomputes: every stream exact, nothing repeated)."""

import pytest
from pipeline_helpers import deep_tiny, make_engine, run_streams, switch_now

from worker.pipeline import StageSpec
from worker.stage_server import spawn as start_stage_server


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return deep_tiny(tmp_path_factory.mktemp("deep-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def one_stage_tokens(model):
    return run_streams(make_engine(model))


@pytest.fixture(scope="module")
def stage_servers(servers):
    procs = [start_stage_server(servers.nats_url, f"s{i}") for i in (1, 2)]
    yield servers.nats_url
    for proc in procs:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def engine(model):
    engine = make_engine(model)
    yield engine
    engine.close_pipelines()


@pytest.mark.parametrize("specs", [
    [StageSpec(0, 2), StageSpec(2, 4, "remote", "s1")],
    [StageSpec(0, 1), StageSpec(1, 3, "remote", "s1"), StageSpec(3, 4, "remote", "s2")],
], ids=["2-stages", "3-stages"])
def test_remote_stages_give_the_one_stage_tokens(engine, stage_servers, one_stage_tokens, specs):
    switch_now(engine, specs, stage_servers)
    assert engine.runner.slots["m"].pipeline.specs == specs
    assert run_streams(engine) == one_stage_tokens


def test_switch_to_a_remote_stage_and_back_mid_stream(engine, stage_servers, one_stage_tokens):
    plans = {3: [StageSpec(0, 1), StageSpec(1, 4, "remote", "s1")], 12: [StageSpec(0, 4)]}
    switches = []

    def at_step(engine, n):
        for switch in switches:  # each switch done within a few steps, before the next one
            switch.wait_ready(60)
        if n in plans:
            switches.append(engine.reconfigure("m", plans[n], stage_servers))

    assert run_streams(engine, at_step=at_step) == one_stage_tokens
    assert [s.error for s in switches] == [None, None]
    assert engine.runner.slots["m"].pipeline.specs == plans[12]


def test_a_stage_that_dies_falls_back_to_one_stage(engine, servers, model, one_stage_tokens):
    proc = start_stage_server(servers.nats_url, "doomed")
    try:
        switch_now(engine, [StageSpec(0, 2), StageSpec(2, 4, "remote", "doomed")], servers.nats_url)

        def at_step(engine, n):
            if n == 4:
                proc.kill()

        assert run_streams(engine, at_step=at_step) == one_stage_tokens
        assert engine.runner.slots["m"].pipeline is None
        assert engine.scheduler.num_preemptions >= len(one_stage_tokens)  # every stream recomputed
    finally:
        proc.kill()
        proc.wait(30)


def test_frames_over_the_max_payload_travel_in_parts(stage_servers, model):
    """KV blocks written to and read back from a remote stage: 3x the NATS max payload."""
    import torch

    from worker.checkpoint import load_config
    from worker.stage_client import RemoteStage, StageClient

    config = load_config(model)
    client = StageClient(stage_servers)
    try:
        stage = RemoteStage(client, StageSpec(2, 4, "remote", "s1"), "parts-test")
        num_blocks = 3 * client.max_payload_bytes // (2 * 4 * 4 * config.num_kv_heads * config.head_dim) + 1
        stage.load(str(model), num_blocks + 1, 4, "float32", "")
        shape = (2, num_blocks, 4, config.num_kv_heads, config.head_dim)
        k, v = torch.randn(shape), torch.randn(shape)
        blocks = list(range(1, num_blocks + 1))
        stage.write_kv(2, 4, blocks, k, v).result(timeout=60)
        got_k, got_v = stage.read_kv(2, 4, blocks).result(timeout=60)
        assert k.numel() * 4 > 3 * client.max_payload_bytes
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        stage.close()
    finally:
        client.close()
