"""Forecast-driven prewarming, live: demand seen by the placer becomes residency commands."""

from __future__ import annotations

import asyncio

import nats
import redis.asyncio as aioredis

from placer.prewarm import Prewarmer
from services import catalog, schemas, subjects
from services.schemas import ResidencyAction, ResidencyCommand, WorkerState


def _slice(worker_id: str, cached: dict[str, float] | None = None) -> WorkerState:
    return WorkerState(worker_id=worker_id, node="n", gpu="g0", backend="cpu", models=frozenset(),
                     cached_fraction=cached or {}, num_running=0, num_waiting=0, max_num_seqs=16,
                     kv_free_frac=1.0, link_util=0.0)


async def test_hot_model_is_prewarmed_on_idle_slices(servers, tiny_model):
    nc = await nats.connect(servers.nats_url)
    redis = aioredis.Redis.from_url(servers.redis_url, decode_responses=True)
    try:
        (entry,) = await catalog.register(redis, [tiny_model("llama")])
        received: list[ResidencyCommand] = []

        async def on_command(msg):
            received.append(schemas.decode(ResidencyCommand, msg.data))

        for worker_id in ("w1", "w2"):
            await nc.subscribe(subjects.worker_residency(worker_id), cb=on_command)
        await nc.flush()
        prewarmer = Prewarmer(nc, redis, budget_bytes=1 << 30)
        assert await prewarmer.plan_once([_slice("w1"), _slice("w2")]) == []  # no demand yet

        for _ in range(200):  # a burst: several requests per second for one model
            prewarmer.observe(entry.model_id)
        actions = await prewarmer.plan_once([_slice("w1"), _slice("w2")])
        await nc.flush()
        await asyncio.sleep(0.2)
        # ~3 requests/s wants more slices than there are: both get the model's tiles
        assert sorted((c.worker_id, c.action, c.model_id) for c in received) == [
            ("w1", ResidencyAction.PREWARM, entry.model_id), ("w2", ResidencyAction.PREWARM, entry.model_id)]
        assert all(0 < c.fraction <= 1 for c in received)
        # slices that hold the planned fraction already are sent nothing
        done = {a.worker_id: {a.model_id: a.rho} for a in actions}
        assert await prewarmer.plan_once([_slice("w1", done["w1"]), _slice("w2", done["w2"])]) == []
    finally:
        await nc.drain()
        await redis.aclose()
