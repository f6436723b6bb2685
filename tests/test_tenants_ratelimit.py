"""gateway.ratelimit's Lua scripts against a real Valkey: buckets, leases, usage."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from gateway import ratelimit
from gateway.ratelimit import Limiter
from services.tenants import Limits, Tenant


@pytest.fixture
async def limiter(servers):
    client = aioredis.from_url(servers.redis_url, decode_responses=True)
    yield Limiter(client)
    await client.aclose()


def tenant(**limits) -> Tenant:
    return Tenant(f"t{uuid.uuid4().hex[:8]}", (), (), Limits(**limits))


async def test_requests_per_minute_bucket(limiter):
    t = tenant(requests_per_minute=2)
    assert await limiter.admit(t, "r1", 1) is None
    assert await limiter.admit(t, "r2", 1) is None
    refusal = await limiter.admit(t, "r3", 1)
    assert refusal.limit == "requests_per_minute"
    assert 25 <= refusal.retry_after_s <= 30  # one request refills in 60 / 2 s
    assert refusal.num_used == 2


async def test_tokens_per_minute_charge_and_correction(limiter):
    t = tenant(tokens_per_minute=100)
    assert await limiter.admit(t, "r1", 60) is None
    refusal = await limiter.admit(t, "r2", 60)
    assert refusal.limit == "tokens_per_minute"
    assert 10 <= refusal.retry_after_s <= 12  # 20 tokens at 100/60 per s
    await limiter.finish(t, "r1", "m", 50, 4, 6, is_counted=True)  # it used 10 of its 60
    assert await limiter.admit(t, "r2", 60) is None


async def test_a_request_larger_than_the_bucket_runs_when_it_is_full(limiter):
    t = tenant(tokens_per_minute=100)
    assert await limiter.admit(t, "big", 500) is None  # never refused forever
    refusal = await limiter.admit(t, "next", 10)
    assert refusal.limit == "tokens_per_minute"
    assert refusal.retry_after_s >= 240  # the debt of 400 tokens is waited out first


async def test_concurrency_slots_are_released(limiter):
    t = tenant(max_concurrent=2)
    assert await limiter.admit(t, "r1", 1) is None
    assert await limiter.admit(t, "r2", 1) is None
    refusal = await limiter.admit(t, "r3", 1)
    assert (refusal.limit, refusal.num_used) == ("max_concurrent", 2)
    assert await limiter.in_flight(t.name) == 2
    await limiter.finish(t, "r1", "m", 0, 0, 0, is_counted=False)
    assert await limiter.in_flight(t.name) == 1
    assert await limiter.admit(t, "r3", 1) is None


async def test_a_lost_slot_comes_back_when_its_lease_expires(limiter, monkeypatch):
    monkeypatch.setattr(ratelimit, "LEASE_S", 0.3)
    t = tenant(max_concurrent=1)
    assert await limiter.admit(t, "crashed", 1) is None  # its gateway never releases it
    deadline = time.monotonic() + 30
    while (refusal := await limiter.admit(t, "next", 1)) is not None:
        assert refusal.limit == "max_concurrent"
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.05)


async def test_renewed_leases_stay(limiter, monkeypatch):
    monkeypatch.setattr(ratelimit, "LEASE_S", 0.2)
    t = tenant(max_concurrent=1)
    assert await limiter.admit(t, "long", 1) is None
    monkeypatch.setattr(ratelimit, "LEASE_S", 60.0)
    await limiter.renew({t.name: ["long", "gone"]})  # "gone" was released: not re-added
    await asyncio.sleep(0.5)  # past the first lease
    assert (await limiter.admit(t, "next", 1)).limit == "max_concurrent"
    assert await limiter.in_flight(t.name) == 1


async def test_usage_is_summed_per_model(limiter):
    t = tenant()
    for request_id, model_id, prompt, completion in (("r1", "m1", 3, 5), ("r2", "m1", 4, 6), ("r3", "m2", 1, 1)):
        assert await limiter.admit(t, request_id, 10) is None
        await limiter.finish(t, request_id, model_id, 0, prompt, completion, is_counted=True)
    assert await limiter.admit(t, "failed", 10) is None
    await limiter.finish(t, "failed", "m1", 10, 0, 0, is_counted=False)
    assert await limiter.usage(t.name) == {
        "m1": {"requests": 2, "prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18},
        "m2": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    assert await limiter.in_flight(t.name) == 0


async def test_gateways_share_one_limit_atomically(servers):
    """Two gateways (two clients) racing 40 admissions against 10 requests per minute."""
    clients = [aioredis.from_url(servers.redis_url, decode_responses=True) for _ in range(2)]
    try:
        limiters = [Limiter(c) for c in clients]
        t = tenant(requests_per_minute=10, max_concurrent=100)
        started_s = time.monotonic()
        refusals = await asyncio.gather(*(limiters[i % 2].admit(t, f"r{i}", 1) for i in range(40)))
        refill = (time.monotonic() - started_s) * 10 / 60  # what the bucket regained meanwhile
        num_admitted = sum(r is None for r in refusals)
        assert 10 <= num_admitted <= 10 + int(refill) + 1
        assert await limiters[0].in_flight(t.name) == num_admitted
    finally:
        for client in clients:
            await client.aclose()
