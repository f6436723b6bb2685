"""gateway.tenancy.TenantGate against a real Valkey: reload by polling the file, the records
shared by every gateway through Redis, a bad edit ignored, a lost record put back."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.tenancy import TenantGate
from services import keys
from services.config import GatewayConfig
from services.errors import C2CError


def _doc(*names: str) -> str:
    return json.dumps({"tenants": [{"name": n, "api_keys": [f"sk-{n}"], "models": [f"{n}-model"]} for n in names]})


@pytest.fixture
async def redis(servers):
    client = aioredis.from_url(servers.redis_url, decode_responses=True)
    yield client
    await client.delete(keys.tenants())
    await client.aclose()


async def _gate(path, redis) -> TenantGate:
    gate = TenantGate(GatewayConfig(tenants_file=str(path), tenants_refresh_s=0.05), CollectorRegistry())
    await gate.start(redis)
    return gate


async def _until(predicate, what: str, ceiling_s: float = 30.0) -> None:
    deadline = time.monotonic() + ceiling_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _names(gate: TenantGate) -> list[str]:
    return [t.name for t in gate.tenants.tenants]


async def test_polling_reload_is_shared_and_survives_bad_edits(tmp_path, redis):
    first, second = tmp_path / "gw1.json", tmp_path / "gw2.yaml"
    first.write_text(_doc("a"))
    second.write_text("tenants:\n  - {name: a, api_keys: [sk-a], models: [a-model]}\n")
    gate1, gate2 = await _gate(first, redis), await _gate(second, redis)
    try:
        assert _names(gate1) == _names(gate2) == ["a"]
        assert gate1.authenticate("Bearer sk-a").name == "a"
        first.write_text(_doc("a", "b"))  # edited on one gateway's copy only
        await _until(lambda: _names(gate1) == _names(gate2) == ["a", "b"], "both gateways to hold b")
        assert gate2.authenticate("Bearer sk-b").name == "b"
        first.write_text('{"tenants": [{"name": "c"}]}')  # a bad edit: logged, the last good set stays
        await gate1.refresh()
        assert _names(gate1) == ["a", "b"]
        await redis.delete(keys.tenants())  # a flushed Valkey: the record comes back
        deadline = time.monotonic() + 30
        while await redis.get(keys.tenants()) is None:
            assert time.monotonic() < deadline, "the tenants record was never put back"
            await asyncio.sleep(0.05)
        assert _names(gate2) == ["a", "b"]
    finally:
        await gate1.stop()
        await gate2.stop()


async def test_keys_and_visibility(tmp_path, redis):
    path = tmp_path / "t.json"
    path.write_text(_doc("a", "b"))
    gate = await _gate(path, redis)
    try:
        for header in ("", "Bearer ", "Basic sk-a", "Bearer sk-c", "Bearer sk-a "):
            if header == "Bearer sk-a ":
                assert gate.authenticate(header).name == "a"
                continue
            with pytest.raises(C2CError) as info:
                gate.authenticate(header)
            assert info.value.http_status == 401
        assert "sk-a" not in await redis.get(keys.tenants())  # only hashes are shared
    finally:
        await gate.stop()


async def test_a_bad_file_stops_the_start(tmp_path, redis):
    path = tmp_path / "t.json"
    path.write_text('{"tenants": [{"name": "a", "api_keys": ["k"], "limits": {"max_concurrent": -2}}]}')
    with pytest.raises(C2CError, match=r"tenants\[0\] \('a'\): limits.max_concurrent"):
        await _gate(path, redis)


async def test_without_a_file_one_optional_key_serves_all(redis):
    open_gate = TenantGate(GatewayConfig(), CollectorRegistry())
    await open_gate.start(redis)
    assert open_gate.authenticate("") is None and not open_gate.is_on
    keyed = TenantGate(GatewayConfig(api_key="sk-one"), CollectorRegistry())
    await keyed.start(redis)
    assert keyed.authenticate("Bearer sk-one") is None
    with pytest.raises(C2CError):
        keyed.authenticate("Bearer sk-two")


async def test_without_a_file_the_api_is_as_before(aiohttp_client, servers):
    from gateway.app import create_app
    from services.config import load_config

    env = {"C2C_NATS_URL": servers.nats_url, "C2C_REDIS_URL": servers.redis_url}
    client = await aiohttp_client(create_app(load_config(GatewayConfig, environ=env, log_it=False)))
    resp = await client.get("/v1/usage")
    assert resp.status == 404  # no such route, as before tenants
    assert (await resp.json())["error"]["message"] == "Invalid URL (GET /v1/usage)"
    assert (await client.get("/v1/models")).status == 200  # no key needed


def test_up_banner_names_the_tenants_file():
    from services.launcher import banner

    lines = "\n".join(banner("http://127.0.0.1:8000", ["m"], 1, "host", False, "/etc/c2c/tenants.yaml"))
    assert "tenants from /etc/c2c/tenants.yaml" in lines and "Bearer $TENANT_KEY" in lines
    assert "tenants" not in "\n".join(banner("http://127.0.0.1:8000", ["m"], 1, "host", False))
