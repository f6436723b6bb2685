"""Fencing at the gateway, against real NATS and Redis: the test plays placer and workers.

It receives the gateway's submits on `c2c.sched.submit` and answers on the request's
inbox with crafted chunks: late ones of a fenced-off epoch, ones from a worker the epoch
is not assigned to, a gap in the sequence (a chunk lost on the bus). The client must get
exactly the right text, once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import nats
import pytest
import redis

from gateway.app import create_app
from services import keys, schemas, subjects
from services.catalog import entry_for, to_hash
from services.config import GatewayConfig, load_config
from services.embedded import EmbeddedServers
from services.schemas import AbortRequest, FinishReason, SubmitRequest, TokenChunk

MODEL = "fencing-model"
WAIT_S = 60  # generous: only a broken gateway waits this long


@pytest.fixture(scope="module")
def private_servers():
    """Servers of this module only: no other test's placer may take these submits."""
    with EmbeddedServers() as running:
        yield running


@pytest.fixture(scope="module")
def catalog_model(private_servers, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models") / MODEL
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    client = redis.Redis.from_url(private_servers.redis_url, decode_responses=True)
    client.hset(keys.model(MODEL), mapping=to_hash(entry_for(model_dir)))
    client.hset(keys.worker("w1"), mapping={"worker_id": "w1"})  # /health wants a live worker
    client.close()
    return MODEL


@pytest.fixture
async def client(aiohttp_client, private_servers, catalog_model):
    env = {"C2C_NATS_URL": private_servers.nats_url, "C2C_REDIS_URL": private_servers.redis_url}
    config = dataclasses.replace(load_config(GatewayConfig, environ=env, log_it=False),
                                 first_chunk_timeout_s=WAIT_S, chunk_timeout_s=WAIT_S)
    return await aiohttp_client(create_app(config))


class FakeCluster:
    """Takes the gateway's submits and the aborts sent to workers w1 and w2."""

    def __init__(self, nc):
        self.nc = nc
        self.submits: asyncio.Queue = asyncio.Queue()
        self.aborts: asyncio.Queue = asyncio.Queue()

    async def start(self) -> FakeCluster:
        await self.nc.subscribe(subjects.SUBMIT, queue=subjects.PLACER_QUEUE, cb=self.submits.put)
        for worker_id in ("w1", "w2"):
            await self.nc.subscribe(subjects.worker_abort(worker_id), cb=self.aborts.put)
        await self.nc.flush()
        return self

    async def next_submit(self) -> tuple[SubmitRequest, str]:
        msg = await asyncio.wait_for(self.submits.get(), WAIT_S)
        return schemas.decode(SubmitRequest, msg.data), msg.reply

    async def next_abort(self) -> tuple[str, AbortRequest]:
        msg = await asyncio.wait_for(self.aborts.get(), WAIT_S)
        return subjects.worker_id_of(msg.subject), schemas.decode(AbortRequest, msg.data)

    async def send(self, reply: str, *chunks: TokenChunk) -> None:
        for chunk in chunks:
            await self.nc.publish(reply, schemas.encode(chunk))
        await self.nc.flush()


@pytest.fixture
async def fake(private_servers):
    nc = await nats.connect(private_servers.nats_url)
    yield await FakeCluster(nc).start()
    await nc.close()


def _chunk(req: SubmitRequest, worker_id: str, seq: int, text: str, epoch: int | None = None, **kw) -> TokenChunk:
    token_ids = [100 + seq] if text else []
    return TokenChunk(req.request_id, worker_id, token_ids, text, epoch=req.epoch if epoch is None else epoch,
                      seq=seq, **kw)


def _final(req, worker_id, seq, text, epoch=None, **kw) -> TokenChunk:
    return _chunk(req, worker_id, seq, text, epoch, finish_reason=FinishReason.LENGTH, num_prompt_tokens=3,
                  num_generated_tokens=kw.pop("num_generated_tokens", 2), **kw)


def _post(client, max_tokens: int = 2):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": max_tokens, "temperature": 0}
    return asyncio.ensure_future(client.post("/v1/completions", json=body))


async def _text(response_task) -> str:
    resp = await asyncio.wait_for(response_task, WAIT_S)
    body = await resp.json()
    assert resp.status == 200, body
    return body["choices"][0]["text"]


async def test_chunks_of_other_epochs_and_workers_are_dropped(client, fake):
    response = _post(client)
    req, reply = await fake.next_submit()
    assert req.epoch == 1
    await fake.send(reply, _chunk(req, "w1", 0, "Hel"),
                    _chunk(req, "w2", 1, "XX"),  # a worker this epoch is not assigned to
                    _chunk(req, "w1", 1, "YY", epoch=0),  # an epoch that is not current
                    _final(req, "w1", 1, "lo"))
    assert await _text(response) == "Hello"


async def test_a_gap_in_the_sequence_redispatches_with_the_tokens_so_far(client, fake):
    response = _post(client, max_tokens=3)
    req, reply = await fake.next_submit()
    await fake.send(reply, _chunk(req, "w1", 0, "a"), _chunk(req, "w1", 2, "c"))  # #1 was lost
    worker_id, abort = await fake.next_abort()
    assert (worker_id, abort.request_id, abort.epoch) == ("w1", req.request_id, 1)  # fenced off
    again, reply2 = await fake.next_submit()
    assert again.epoch == 2 and again.request_id == req.request_id
    assert again.resumed_token_ids == [100] and again.resumed_num_chars == 1
    await fake.send(reply2, _chunk(req, "w1", 3, "late", epoch=1),  # the fenced worker goes on
                    _chunk(again, "w2", 0, "b", num_resumed_tokens=1),
                    _final(again, "w2", 1, "c", num_generated_tokens=3))
    assert await _text(response) == "abc"


async def test_a_slow_worker_declared_dead_cannot_add_text(client, fake):
    """The placer re-dispatches; the first worker resumes and keeps sending: dropped."""
    response = _post(client, max_tokens=3)
    req, reply = await fake.next_submit()
    await fake.send(reply, _chunk(req, "w1", 0, "a"), TokenChunk(req.request_id, "w1", redispatch=True, epoch=1))
    again, reply2 = await fake.next_submit()
    assert again.epoch == 2 and again.resumed_token_ids == [100]
    await fake.send(reply2, _chunk(req, "w1", 1, "DUP", epoch=1),
                    TokenChunk(req.request_id, "w1", redispatch=True, epoch=1),  # stale: no epoch 3
                    _chunk(again, "w2", 0, "b", num_resumed_tokens=1),
                    _final(again, "w2", 1, "c", num_generated_tokens=3))
    assert await _text(response) == "abc"
    assert fake.submits.empty()  # the stale re-dispatch made no third submit


async def test_streamed_text_has_no_duplicates_across_a_redispatch(client, fake):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}
    response = asyncio.ensure_future(client.post("/v1/completions", json=body))
    req, reply = await fake.next_submit()
    await fake.send(reply, _chunk(req, "w1", 0, "a"))
    resp = await asyncio.wait_for(response, WAIT_S)
    assert resp.status == 200
    await fake.send(reply, TokenChunk(req.request_id, "", redispatch=True, epoch=1))
    again, reply2 = await fake.next_submit()
    await fake.send(reply2, _chunk(req, "w1", 1, "DUP", epoch=1), _chunk(again, "w2", 0, "b", num_resumed_tokens=1),
                    _final(again, "w2", 1, "c", num_generated_tokens=3))
    texts = [json.loads(line[6:])["choices"][0]["text"] async for line in _events(resp)]
    assert "".join(texts) == "abc"


async def _events(resp):
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            yield line


async def test_too_many_redispatches_fail_with_503(client, fake):
    response = _post(client)
    for epoch in range(1, 6):
        req, reply = await fake.next_submit()
        assert req.epoch == epoch
        if epoch == 5:
            break
        await fake.send(reply, TokenChunk(req.request_id, "w1", redispatch=True, epoch=epoch))
    await fake.send(reply, TokenChunk(req.request_id, "w1", redispatch=True, epoch=5))
    resp = await asyncio.wait_for(response, WAIT_S)
    assert resp.status == 503
    assert "re-dispatches" in (await resp.json())["error"]["message"]


async def test_the_request_deadline_ends_a_slow_request_with_504(aiohttp_client, private_servers, catalog_model, fake):
    """Chunks keep coming, but too slowly to finish in time: 504, and the worker is told."""
    env = {"C2C_NATS_URL": private_servers.nats_url, "C2C_REDIS_URL": private_servers.redis_url}
    config = dataclasses.replace(load_config(GatewayConfig, environ=env, log_it=False), request_timeout_s=1.0)
    client = await aiohttp_client(create_app(config))
    response = _post(client, max_tokens=100)
    req, reply = await fake.next_submit()
    for seq in range(100):  # until the gateway gives up (one chunk per 50 ms)
        await fake.send(reply, _chunk(req, "w1", seq, "x"))
        if response.done():
            break
        await asyncio.sleep(0.05)
    resp = await asyncio.wait_for(response, WAIT_S)
    assert resp.status == 504
    assert "deadline" in (await resp.json())["error"]["message"]
    worker_id, abort = await fake.next_abort()
    assert (worker_id, abort.request_id) == ("w1", req.request_id)


async def test_no_bus_answers_503_at_once(aiohttp_client, catalog_model, tmp_path):
    """NATS down: 503 with Retry-After within a second, not a 60 s wait."""
    import time

    with EmbeddedServers() as servers:
        model_client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
        entry = to_hash(entry_for(_model_dir(tmp_path)))
        model_client.hset(keys.model(MODEL), mapping=entry)
        model_client.close()
        env = {"C2C_NATS_URL": servers.nats_url, "C2C_REDIS_URL": servers.redis_url}
        client = await aiohttp_client(create_app(load_config(GatewayConfig, environ=env, log_it=False)))
        nats_proc = servers._procs[0]
        nats_proc.kill()
        nats_proc.wait()
        for _ in range(3):
            started = time.monotonic()
            resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"]
            assert (await resp.json())["error"]["message"]
            assert time.monotonic() - started < 20  # milliseconds here; a hang would be the 60 s chunk timeout


def _model_dir(tmp_path):
    model_dir = tmp_path / MODEL
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    return model_dir


async def test_open_streams_fail_with_503_when_the_bus_stays_down(aiohttp_client, tmp_path):
    """NATS dies mid-stream and does not come back: the client hears within the grace."""
    from gateway.core import BUS_GRACE_S

    with EmbeddedServers() as servers:
        model_client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
        model_client.hset(keys.model(MODEL), mapping=to_hash(entry_for(_model_dir(tmp_path))))
        model_client.close()
        env = {"C2C_NATS_URL": servers.nats_url, "C2C_REDIS_URL": servers.redis_url}
        config = dataclasses.replace(load_config(GatewayConfig, environ=env, log_it=False),
                                     first_chunk_timeout_s=WAIT_S, chunk_timeout_s=WAIT_S)
        client = await aiohttp_client(create_app(config))
        nc = await nats.connect(servers.nats_url)
        fake = await FakeCluster(nc).start()
        response = _post(client, max_tokens=5)
        req, reply = await fake.next_submit()
        await fake.send(reply, _chunk(req, "w1", 0, "a"))
        servers._procs[0].kill()  # nats-server
        resp = await asyncio.wait_for(response, WAIT_S)
        assert resp.status == 503
        assert "message bus" in (await resp.json())["error"]["message"]
        assert BUS_GRACE_S < WAIT_S
        await nc.close()


async def test_a_submit_no_worker_took_is_redispatched(client, fake):
    """Core NATS may drop a submit (a server died mid-route): no `accepted` within
    ACCEPT_TIMEOUT_S and the gateway re-dispatches instead of waiting a minute."""
    from gateway.stream import ACCEPT_TIMEOUT_S

    response = _post(client)
    req, _ = await fake.next_submit()  # ... and never answered: lost
    again, reply = await asyncio.wait_for(fake.next_submit(), WAIT_S + ACCEPT_TIMEOUT_S)
    assert (again.request_id, again.epoch) == (req.request_id, 2)
    await fake.send(reply, TokenChunk(req.request_id, "w2", epoch=2, accepted=True),
                    _chunk(again, "w2", 0, "Hel"), _final(again, "w2", 1, "lo"))
    assert await _text(response) == "Hello"


async def test_an_epoch_handed_over_by_live_migration_goes_on_from_the_new_worker(client, fake):
    """w1 hands the epoch to w2 (live migration): w2's first chunk names w1 and continues
    the sequence; a claim naming another worker and w1's chunks after it are dropped."""
    response = _post(client, max_tokens=3)
    req, reply = await fake.next_submit()
    await fake.send(reply, _chunk(req, "w1", 0, "a"),
                    _chunk(req, "w3", 1, "XX", migrated_from="w9"),  # w9 never held this epoch
                    _chunk(req, "w2", 1, "b", migrated_from="w1"),
                    _chunk(req, "w1", 2, "DUP"),  # the old worker, after the handover
                    _final(req, "w2", 2, "c", num_generated_tokens=3))
    assert await _text(response) == "abc"
    assert fake.aborts.empty() and fake.submits.empty()  # no re-dispatch
