"""Pipelines across the workers of a LocalCluster (real NATS, Valkey, gateway, placer):
each of two workers is told on `c2c.worker.<id>.pipeline` to run its model's last layers
on the other worker's slice (every worker hosts stages); the switch happens while 8
streams run through the gateway, and every stream stays exact."""

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

MAX_TOKENS = 24
WAIT_S = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return deep_tiny(tmp_path_factory.mktemp("svc-deep"), "qwen2")


@pytest.fixture(scope="module")
def cluster(servers, model_dir):
    with LocalCluster([model_dir], num_workers=2, nats_url=servers.nats_url, redis_url=servers.redis_url,
                      extra_env={"C2C_PREWARM_INTERVAL_S": "0"}) as running:
        yield running


async def _streams(cluster, model_id: str) -> list[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        responses = await asyncio.gather(*[session.post(f"{cluster.url}/v1/completions", json={
            "model": model_id, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}) for p in PROMPTS])
        assert all(r.status == 200 for r in responses)
        return await asyncio.gather(*[stream_text(r) for r in responses])


async def _wait_for_log(cluster, text: str) -> None:
    deadline_s = time.monotonic() + WAIT_S
    logs = [cluster.workdir / f"{w}.log" for w in cluster.worker_ids]
    while not any(text in p.read_text(errors="replace") for p in logs if p.exists()):
        assert time.monotonic() < deadline_s, f"no {text!r} in the workers' logs:\n" + "\n".join(
            cluster.log_tail(w, 15) for w in cluster.worker_ids)
        await asyncio.sleep(0.1)


async def test_workers_switch_to_stages_on_each_other_mid_stream(cluster, model_dir, greedy_texts):
    expected = greedy_texts(model_dir, PROMPTS, MAX_TOKENS)
    nc = await natsutil.connect_nats(cluster.nats_url, "test-pipeline")
    try:
        streams = asyncio.ensure_future(_streams(cluster, model_dir.name))
        for driver, other in zip(cluster.worker_ids, reversed(cluster.worker_ids), strict=True):
            command = PipelineCommand(model_dir.name, [StageWire(0, 2), StageWire(2, 4, "remote", other)])
            await nc.publish(subjects.worker_pipeline(driver), schemas.encode(command))
        assert dict(zip(PROMPTS, await streams, strict=True)) == expected
        await _wait_for_log(cluster, "layers [2, 4)")       # a worker loaded a stage for the other
        assert dict(zip(PROMPTS, await _streams(cluster, model_dir.name), strict=True)) == expected
        await _wait_for_log(cluster, "first forward of")    # and ran steps through it
    finally:
        await natsutil.close_nats(nc)
