"""KV rotation live: real nats-server + Redis, gateway, placer, controller and one CPU
worker (LocalCluster) whose KV cache holds 12 blocks, so four concurrent requests cannot
all grow and running ones rotate to the host tier and back. Greedy answers equal the
engine's own; the gateway's /metrics show the swaps, and both tiers empty afterwards."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from services.launcher import LocalCluster

PROMPTS = ["The quick brown fox", "Hello, world", "one two three four", "a b c d e f"]
MAX_TOKENS = 40
KV_BLOCKS = 12
BLOCK_BYTES = 16 * 512  # the tiny llama: 2 layers x 2 KV heads x 16 dims x K and V x fp32 per token


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(servers, model):
    env = {"C2C_KV_CACHE_BYTES": str(KV_BLOCKS * BLOCK_BYTES), "C2C_PREWARM_INTERVAL_S": "0"}
    with LocalCluster([model], num_workers=1, nats_url=servers.nats_url, redis_url=servers.redis_url,
                      extra_env=env) as running:
        yield running


@pytest.fixture(scope="module")
def expected(model):
    from worker.engine import Engine, SamplingParams

    engine = Engine()
    engine.add_model(model.name, model)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return {p: engine.generate(model.name, p, params).new_text for p in PROMPTS}


async def test_rotation_under_kv_pressure_keeps_answers_and_frees_blocks(cluster, model, expected):
    async with aiohttp.ClientSession() as session:
        async def complete(prompt: str) -> str:
            body = {"model": model.name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}
            async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return (await resp.json())["choices"][0]["text"]

        for _ in range(3):  # rounds of four at once, until the worker rotated some KV
            num_before = _swaps(await _kv_series(session, cluster), "out")
            texts = await asyncio.gather(*(complete(p) for p in PROMPTS))
            assert texts == [expected[p] for p in PROMPTS]
            if await _wait_for(session, cluster, lambda s, before=num_before: _swaps(s, "out") > before, timeout_s=3.0):
                break
        series = await _wait_for(session, cluster, _tiers_idle, timeout_s=30.0)
    assert series and _swaps(series, "out") > 0 and _swaps(series, "in") == _swaps(series, "out")


async def _kv_series(session, cluster) -> dict[str, float]:
    async with session.get(f"{cluster.url}/metrics") as resp:
        metrics = await resp.text()
    return {name: float(value) for name, value in re.findall(r"^(c2c_kv_(?:blocks|swaps_total)\{[^}]*\}) (\S+)$",
                                                             metrics, re.M)}


def _swaps(series: dict[str, float], direction: str) -> float:
    return sum(v for k, v in series.items() if k.startswith("c2c_kv_swaps_total") and f'"{direction}"' in k)


def _tiers_idle(series: dict[str, float]) -> bool:
    blocks = [v for k, v in series.items() if k.startswith("c2c_kv_blocks")]
    return len(blocks) == 2 and not any(blocks)


async def _wait_for(session, cluster, predicate, timeout_s: float) -> dict[str, float] | None:
    """The c2c_kv_* series once `predicate` holds for them (the worker's telemetry comes
    every 100 ms); None if it did not within timeout_s."""
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        series = await _kv_series(session, cluster)
        if predicate(series):
            return series
        await asyncio.sleep(0.1)
    return None
