"""Gateway validation and error mapping, through the app factory, against real NATS/Redis.

No worker runs here: requests that pass validation reach the placer (or nobody) and
must come back as a prompt 503, never hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
import redis

from gateway.app import create_app
from placer.service import Placer
from services import keys
from services.catalog import entry_for, to_hash
from services.config import GatewayConfig, PlacerConfig, load_config

MODEL = "validation-model"


@pytest.fixture(scope="module")
def catalog_model(servers, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models") / MODEL
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    entry = entry_for(model_dir)
    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    client.hset(keys.model(MODEL), mapping=to_hash(entry))
    yield MODEL
    client.delete(keys.model(MODEL))


def _config(servers, **kw) -> GatewayConfig:
    env = {"C2C_NATS_URL": servers.nats_url, "C2C_REDIS_URL": servers.redis_url}
    config = load_config(GatewayConfig, environ=env, log_it=False)
    return dataclasses.replace(config, **kw)


@pytest.fixture
async def client(aiohttp_client, servers, catalog_model):
    return await aiohttp_client(create_app(_config(servers)))


def _assert_error(body: dict, type_: str, param=None, code=None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_ and body["error"]["message"]
    assert body["error"]["param"] == param
    assert body["error"]["code"] == code


async def test_malformed_json_is_400(client):
    resp = await client.post("/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    _assert_error(await resp.json(), "invalid_request_error")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": 7}, "prompt"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"a": 1}}, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
])
async def test_bad_parameters_are_400_naming_the_param(client, path, body, param):
    resp = await client.post(path, json=body)
    assert resp.status == 400, await resp.text()
    _assert_error(await resp.json(), "invalid_request_error", param=param)


async def test_unknown_model_is_404(client):
    resp = await client.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi"})
    assert resp.status == 404
    _assert_error(await resp.json(), "invalid_request_error", param="model", code="model_not_found")


async def test_no_placer_is_503_at_once(client):
    started = time.monotonic()
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    _assert_error(await resp.json(), "server_error", code="no_capacity")
    # the gateway retries a submit nobody heard for 2.75 s (a placer restarting); a hang is 60 s
    assert time.monotonic() - started < 20


async def test_placer_without_workers_is_503_at_once(client, servers):
    placer = Placer(PlacerConfig(nats_url=servers.nats_url, redis_url=servers.redis_url))
    await placer.start()
    try:
        for stream in (False, True):
            started = time.monotonic()
            resp = await client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
            assert resp.status == 503
            body = await resp.json()
            _assert_error(body, "server_error", code="no_capacity")
            assert "worker" in body["error"]["message"]
            assert time.monotonic() - started < 5
    finally:
        await placer.stop()


async def test_models_and_metrics(client):
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    assert {"id": MODEL, "object": "model"}.items() <= next(m for m in body["data"] if m["id"] == MODEL).items()
    text = await (await client.get("/metrics")).text()
    assert "c2c_requests_waiting" in text and "c2c_time_to_first_token_seconds" in text


async def test_unknown_route_has_openai_error_body(client):
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "error" in await resp.json()


async def test_api_key_is_enforced(aiohttp_client, servers, catalog_model):
    client = await aiohttp_client(create_app(_config(servers, api_key="sekret")))
    resp = await client.get("/v1/models")
    assert resp.status == 401
    _assert_error(await resp.json(), "authentication_error", code="invalid_api_key")
    resp = await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
    assert resp.status == 200


async def test_gateway_keeps_serving_after_errors(client):
    for _ in range(3):
        await client.post("/v1/completions", data=b"][")
    await asyncio.sleep(0)
    assert (await client.get("/v1/models")).status == 200


async def test_models_dir_is_registered_at_start(aiohttp_client, servers, tmp_path):
    model_dir = tmp_path / "from-models-dir"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 64}))
    (tmp_path / "not-a-model").mkdir()
    client = await aiohttp_client(create_app(_config(servers, models_dir=str(tmp_path))))
    ids = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
    assert "from-models-dir" in ids and "not-a-model" not in ids


async def test_silent_upstream_is_504(aiohttp_client, servers, catalog_model):
    import nats

    from services import subjects

    nc = await nats.connect(servers.nats_url)
    await nc.subscribe(subjects.SUBMIT, queue=subjects.PLACER_QUEUE)  # takes requests, never answers
    try:
        client = await aiohttp_client(create_app(_config(servers, first_chunk_timeout_s=0.5)))
        started = time.monotonic()
        resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert resp.status == 504
        _assert_error(await resp.json(), "server_error", code="timeout")
        assert time.monotonic() - started < 5
    finally:
        await nc.close()


# -- /health and /ready: worker heartbeats in Redis, answers bounded when Redis fails ---------
async def _poll_status(client, path: str, status: int, ceiling_s: float = 15.0):
    """The first response of `path` with `status` (answers are cached ~1 s), within a ceiling."""
    deadline = time.monotonic() + ceiling_s
    while True:
        resp = await client.get(path)
        if resp.status == status or time.monotonic() > deadline:
            return resp
        await asyncio.sleep(0.1)


@pytest.fixture
def no_live_workers(servers):
    """Waits until no worker heartbeat is left from other test modules (their TTL expires)."""
    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    deadline = time.monotonic() + 60
    while any(True for _ in client.scan_iter(match=keys.WORKER_PATTERN)) and time.monotonic() < deadline:
        time.sleep(0.2)
    yield client
    client.close()


async def test_health_and_ready_follow_worker_heartbeats(client, no_live_workers):
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json()) == {"status": "degraded", "reason": "no worker heartbeat"}
    fake = keys.worker(f"fake-validation-{time.monotonic_ns()}")
    no_live_workers.hset(fake, mapping={"worker_id": fake, "pinned_models": "someone-else,another"})
    no_live_workers.expire(fake, 60)
    try:
        assert (await _poll_status(client, "/health", 200)).status == 200
        assert (await (await client.get("/ready")).json())["status"] == "ready"
        resp = await client.get(f"/ready?model={MODEL}")
        assert resp.status == 503 and "no live worker serves" in (await resp.json())["reason"]
        resp = await client.get("/ready?model=no-such-model")
        assert resp.status == 404
        _assert_error(await resp.json(), "invalid_request_error", param="model", code="model_not_found")
        no_live_workers.hdel(fake, "pinned_models")  # now it serves any model
        resp = await _poll_status(client, f"/ready?model={MODEL}", 200)
        assert resp.status == 200 and (await resp.json())["num_workers"] == 1
    finally:
        no_live_workers.delete(fake)
    resp = await _poll_status(client, "/health", 503)
    assert resp.status == 503


async def _silent_server():
    """A TCP server that accepts connections and never answers (a stalled Redis)."""
    return await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)


@pytest.mark.parametrize("failure", ["refused", "stalled"])
async def test_health_and_ready_answer_503_quickly_when_redis_fails(client, failure):
    import redis.asyncio as aioredis

    from gateway.app import CORE

    core = client.server.app[CORE]
    server = await _silent_server() if failure == "stalled" else None
    port = server.sockets[0].getsockname()[1] if server else 1
    broken = aioredis.from_url(f"redis://127.0.0.1:{port}", decode_responses=True)
    core.redis, working = broken, core.redis
    try:
        for path in ("/health", "/ready", "/ready?model=not-in-the-cached-catalog"):
            started = time.monotonic()
            resp = await client.get(path)
            assert resp.status == 503, (path, await resp.text())
            assert time.monotonic() - started < 5
            body = await resp.json()
            if "error" in body:  # the catalog lookup of /ready?model= failed: OpenAI's body
                _assert_error(body, "server_error", code="no_capacity")
            else:
                assert body["reason"].startswith("Redis unavailable: ") and len(body["reason"]) > 19, body
    finally:
        core.redis = working
        await broken.aclose()
        if server:
            server.close()
