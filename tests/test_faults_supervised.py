"""Faults under `up`'s supervisor: a worker killed mid-stream comes back under the same id
before its heartbeat expires. The placer must tell the new process from the old one
(incarnation) and re-dispatch what the old one ran: every stream ends exactly right."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest
from sse import stream_text

from services.launcher import LocalCluster

PROMPTS = ["The quick brown fox", "Hello, world", "One two three", "Lorem ipsum"]
MAX_TOKENS = 400
WAIT_S = 180.0


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=5)


@pytest.fixture(scope="module")
def expected(model_dir, greedy_texts):
    return greedy_texts(model_dir, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(model_dir):
    # a long expiry: the supervisor restarts the worker well before the placer would declare it dead
    env = {"C2C_WORKER_EXPIRY_S": "30", "C2C_HEARTBEAT_TTL_S": "30", "C2C_PREWARM_INTERVAL_S": "0"}
    with LocalCluster([model_dir], num_workers=2, supervise=True, extra_env=env) as running:
        yield running


async def test_streams_survive_a_worker_restarted_under_its_id(cluster, model_dir, expected):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        responses = await asyncio.gather(*[session.post(f"{cluster.url}/v1/completions", json={
            "model": model_dir.name, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}) for p in PROMPTS])
        assert all(r.status == 200 for r in responses)
        os.kill(cluster.pid(responses[0].headers["X-Worker-Id"]), signal.SIGKILL)
        texts = await asyncio.gather(*[stream_text(r) for r in responses])
    assert texts == [expected[p] for p in PROMPTS]
