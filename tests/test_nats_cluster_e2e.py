"""The services on a 3-server NATS cluster (routes, credentials, loopback): the server the
gateway is connected to is killed mid-stream. The gateway and workers fail over to the
others, the streams are re-dispatched (chunks published during the switch are lost on
core NATS), and every answer is exactly the engine's greedy output: nothing lost."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from sse import stream_text

from services.launcher import LocalCluster
from services.natscluster import NatsCluster

PROMPTS = ["The quick brown fox", "Hello, world", "One two three", "Lorem ipsum"]
MAX_TOKENS = 400
WAIT_S = 180.0


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=9)


@pytest.fixture(scope="module")
def nats_cluster():
    with NatsCluster(num_servers=3, user="c2c", password="c2c-test-7d1e") as running:
        yield running


@pytest.fixture(scope="module")
def cluster(servers, nats_cluster, model_dir):
    env = {"C2C_PREWARM_INTERVAL_S": "0"}
    with LocalCluster([model_dir], num_workers=2, nats_url=nats_cluster.url, redis_url=servers.redis_url,
                      extra_env=env) as running:
        yield running


def _gateway_member(nats_cluster: NatsCluster) -> int:
    """The index of the server the gateway's connection is on (monitoring /connz)."""
    for index, member in enumerate(nats_cluster.members):
        if member.is_running and any(c.get("name", "").startswith("gateway-")
                                     for c in member.monitor("connz").get("connections", [])):
            return index
    raise AssertionError("no server has the gateway's connection")


async def test_streams_survive_losing_the_gateways_nats_server(cluster, nats_cluster, model_dir, greedy_texts):
    expected = greedy_texts(model_dir, PROMPTS, MAX_TOKENS)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        responses = await asyncio.gather(*[session.post(f"{cluster.url}/v1/completions", json={
            "model": model_dir.name, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}) for p in PROMPTS])
        assert all(r.status == 200 for r in responses)
        nats_cluster.kill(_gateway_member(nats_cluster))
        try:
            texts = await asyncio.gather(*[stream_text(r) for r in responses])
        except AssertionError:
            for name in ("gateway", "placer", *cluster.worker_ids):
                lines = [ln for ln in cluster.log_tail(name, 5000).splitlines() if "INFO" not in ln or "epoch" in ln]
                print(f"---- {name}\n" + "\n".join(lines[-80:]))
            raise
        assert texts == [expected[p] for p in PROMPTS]
        body = {"model": model_dir.name, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0}
        async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:  # and it serves on
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["text"] == expected[PROMPTS[0]]
