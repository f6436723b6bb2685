"""Live migration against a real cluster (nats-server, Valkey, gateway, placer, four CPU
workers): a migration whose target dies half-way leaves the request where it was; a
request moved to a worker that then dies is re-dispatched from there (re-prefill); a
worker drained with SIGTERM moves its streams with their KV to another worker. Outputs
are greedy and compared with the engine's own; every chunk on the bus is counted, so a
token served twice or re-prefilled would show. Every wait is on an event, with a ceiling.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import nats
import pytest
from failover import failover_cluster
from sse import stream_text
from test_faults_e2e import _metric, _telemetry_of, _wait_for

from services import keys, schemas, subjects
from services.schemas import MigrateCommand, MigrationResult, TokenChunk

PROMPTS = ["The quick brown fox", "Hello, world"]
MAX_TOKENS = 1800  # tiny's window is 2048: long enough to be mid-stream when we act
WAIT_S = 180.0


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=7)


@pytest.fixture(scope="module")
def cluster(servers, model_dir):
    with failover_cluster([model_dir], servers, num_workers=4) as running:
        yield running


@pytest.fixture(scope="module")
def expected(model_dir, greedy_texts):
    return greedy_texts(model_dir, PROMPTS, MAX_TOKENS)


class _Bus:
    """Every TokenChunk on the bus, and a way to wait for some."""

    def __init__(self, nc):
        self.nc, self.chunks, self.changed = nc, [], asyncio.Event()

    async def start(self) -> _Bus:
        async def on_chunk(msg):
            self.chunks.append(schemas.decode(TokenChunk, msg.data))
            self.changed.set()

        await self.nc.subscribe(f"{subjects.PREFIX}.inbox.>", cb=on_chunk)
        await self.nc.flush()
        return self

    async def wait_tokens(self, worker_id: str, num_tokens: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while sum(len(c.token_ids) for c in self.chunks if c.worker_id == worker_id) < num_tokens:
                self.changed.clear()
                await self.changed.wait()

    def assert_served_once(self) -> None:
        """No (request, epoch, chunk index) carried tokens twice: nothing served twice."""
        seen = {}
        for c in self.chunks:
            if c.token_ids:
                key = (c.request_id, c.epoch, c.seq)
                assert key not in seen, f"chunk {key} sent by {seen[key]} and {c.worker_id}"
                seen[key] = c.worker_id


async def _open_streams(session, url, model_id):
    responses = await asyncio.gather(*[session.post(f"{url}/v1/completions", json={
        "model": model_id, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
        "stream": True}) for p in PROMPTS])
    assert all(r.status == 200 for r in responses)
    return responses


async def test_a_migration_whose_target_dies_leaves_the_request_in_place(cluster, model_dir, expected):
    before = await _metric(cluster.url, "c2c_redispatches_total")
    nc = await nats.connect(cluster.nats_url)
    bus = await _Bus(nc).start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        responses = await _open_streams(session, cluster.url, model_dir.name)
        source = responses[0].headers["X-Worker-Id"]
        serving = {r.headers["X-Worker-Id"] for r in responses}
        target = next(w for w in reversed(cluster.worker_ids) if w not in serving)  # its death touches no stream
        target_pid = cluster.pid(target)

        async def kill_target(msg):  # the target dies as the first KV blocks reach it
            os.kill(target_pid, signal.SIGKILL)

        await nc.subscribe(subjects.worker_migrate(target, "kv"), cb=kill_target)
        await bus.wait_tokens(source, 40)
        request_id = bus.chunks[0].request_id if bus.chunks[0].worker_id == source else next(
            c.request_id for c in bus.chunks if c.worker_id == source)
        reply = await nc.request(subjects.worker_migrate(source), schemas.encode(
            MigrateCommand(request_id, target_worker_id=target)), timeout=WAIT_S)
        result = schemas.decode(MigrationResult, reply.data)
        texts = await asyncio.gather(*[stream_text(r) for r in responses])
    assert not result.is_moved and result.error
    assert texts == [expected[p] for p in PROMPTS]
    assert await _metric(cluster.url, "c2c_redispatches_total") == before  # it simply went on
    assert all(c.worker_id != target for c in bus.chunks if c.request_id == request_id)
    bus.assert_served_once()
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis_url)
    await _wait_for(lambda: redis.exists(keys.worker(target)), lambda n: n == 0)  # gone: no target for the next test
    await redis.aclose()
    await nc.close()


async def test_a_moved_request_whose_new_worker_dies_is_redispatched(cluster, model_dir, expected):
    before = await _metric(cluster.url, "c2c_redispatches_total")
    nc = await nats.connect(cluster.nats_url)
    bus = await _Bus(nc).start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        responses = await _open_streams(session, cluster.url, model_dir.name)
        source = responses[0].headers["X-Worker-Id"]
        await bus.wait_tokens(source, 40)
        reply = await nc.request(subjects.worker_migrate(source), schemas.encode(MigrateCommand("")),
                                 timeout=WAIT_S)  # no request named: the source picks one (as rebalancing does)
        result = schemas.decode(MigrationResult, reply.data)
        assert result.is_moved, result.error
        request_id = result.request_id
        async with _telemetry_of(cluster, result.target_worker_id) as telemetry:  # the placer hears it too
            await _wait_for(telemetry.get, lambda t: request_id in t.request_ids)
        os.kill(cluster.pid(result.target_worker_id), signal.SIGKILL)
        texts = await asyncio.gather(*[stream_text(r) for r in responses])
    assert texts == [expected[p] for p in PROMPTS]
    assert await _metric(cluster.url, "c2c_redispatches_total") > before  # the placer followed it
    bus.assert_served_once()
    await nc.close()


async def test_a_draining_worker_moves_its_streams_with_their_kv(cluster, model_dir, expected):
    before = {name: await _metric(cluster.url, name) for name in ("c2c_redispatches_total", "c2c_migrations_total")}
    nc = await nats.connect(cluster.nats_url)
    bus = await _Bus(nc).start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        responses = await _open_streams(session, cluster.url, model_dir.name)
        source = responses[0].headers["X-Worker-Id"]
        await bus.wait_tokens(source, 40)
        os.kill(cluster.pid(source), signal.SIGTERM)
        texts = await asyncio.gather(*[stream_text(r) for r in responses])
    assert texts == [expected[p] for p in PROMPTS]  # nothing lost, repeated or reordered
    assert await _metric(cluster.url, "c2c_migrations_total") > before["c2c_migrations_total"]
    assert await _metric(cluster.url, "c2c_redispatches_total") == before["c2c_redispatches_total"]
    moved = [c for c in bus.chunks if c.migrated_from == source]
    assert moved and all(c.worker_id != source for c in moved)
    bus.assert_served_once()
    await nc.close()
