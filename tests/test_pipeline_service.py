"""A worker of a LocalCluster (real NATS, Valkey, gateway, placer) told on
`c2c.worker.<id>.pipeline` to serve its model as a driver stage plus a remote stage
server: the switch happens while 8 streams run through the gateway, each stays exact."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from pipeline_helpers import PROMPTS, deep_tiny
from sse import stream_text

from services import natsutil, schemas, subjects
from services.launcher import LocalCluster
from services.stage_wire import PipelineCommand, StageWire
from worker.stage_server import spawn

MAX_TOKENS = 24
WAIT_S = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return deep_tiny(tmp_path_factory.mktemp("svc-deep"), "qwen2")


@pytest.fixture(scope="module")
def cluster(servers, model_dir):
    with LocalCluster([model_dir], num_workers=1, nats_url=servers.nats_url, redis_url=servers.redis_url,
                      extra_env={"C2C_PREWARM_INTERVAL_S": "0"}) as running:
        yield running


async def _wait_for_line(path, text: str, timeout_s: float = WAIT_S) -> None:
    deadline_s = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline_s, f"no {text!r} in the stage server's log"
        await asyncio.sleep(0.1)


async def test_a_worker_switches_to_a_remote_stage_mid_stream(servers, cluster, model_dir, greedy_texts, tmp_path):
    expected = greedy_texts(model_dir, PROMPTS, MAX_TOKENS)
    log_path = tmp_path / "stage.log"
    proc = spawn(servers.nats_url, "svc-stage", log_path=log_path)
    nc = await natsutil.connect_nats(servers.nats_url, "test-pipeline")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
            responses = await asyncio.gather(*[session.post(f"{cluster.url}/v1/completions", json={
                "model": model_dir.name, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0, "stream": True}) for p in PROMPTS])
            assert all(r.status == 200 for r in responses)
            command = PipelineCommand(model_dir.name, [StageWire(0, 2), StageWire(2, 4, "remote", "svc-stage")])
            await nc.publish(subjects.worker_pipeline(cluster.worker_ids[0]), schemas.encode(command))
            texts = await asyncio.gather(*[stream_text(r) for r in responses])
        assert dict(zip(PROMPTS, texts, strict=True)) == expected
        await _wait_for_line(log_path, "layers [2, 4)")  # the worker loaded its remote stage
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
            responses = await asyncio.gather(*[session.post(f"{cluster.url}/v1/completions", json={
                "model": model_dir.name, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0, "stream": True}) for p in PROMPTS])
            texts = await asyncio.gather(*[stream_text(r) for r in responses])
        assert dict(zip(PROMPTS, texts, strict=True)) == expected
        await _wait_for_line(log_path, "first forward of")  # and ran steps through it
    finally:
        await natsutil.close_nats(nc)
        proc.terminate()
        proc.wait(30)
