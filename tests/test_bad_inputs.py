"""A battery of bad inputs against a live cluster: real nats-server and valkey, gateway,
placer, controller and one CPU worker with a tiny model (LocalCluster, one per module).

Every case (tests/test_bad_inputs_cases.py) must answer a 4xx with OpenAI's error body, or
a correct answer, or (a vanishing client) nothing; and an innocent greedy request sent
beside each group of cases must get exactly the answer it got before the battery. The
cases run once, concurrently by group, in one module fixture; each case is its own test.
Afterwards the gateway's waiting/running gauges are back to 0 and the worker runs nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from dataclasses import dataclass

import aiohttp
import msgspec
import nats
import pytest
import redis
from test_bad_inputs_cases import ANY, CHAT, COMPLETIONS, MODEL, SHORT_MODEL, Case, all_cases, body
from yarl import URL

from services import keys, schemas, subjects
from services.catalog import entry_for, to_hash
from services.launcher import LocalCluster
from services.schemas import WorkerState

CASES = all_cases()
GROUP_SIZE = 10
INNOCENT = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
SHORT_CONTEXT_WINDOW = 32


@dataclass
class Result:
    status: int | None  # None: the client went away without an answer
    headers: dict[str, str]
    text: str


@dataclass
class Battery:
    innocent: str  # the innocent request's text before the battery
    greedy: dict[str, str]  # path -> greedy text of body(path)
    results: dict[str, Result | BaseException]  # case id -> what came back
    innocents: dict[int, str | BaseException]  # group -> the innocent request's text during it


@pytest.fixture(scope="module")
def cluster(servers, tiny_model, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("bad-inputs") / MODEL
    shutil.copytree(tiny_model("llama"), model_dir)
    with LocalCluster([model_dir], num_workers=1, nats_url=servers.nats_url, redis_url=servers.redis_url,
                      extra_env={"C2C_PREWARM_INTERVAL_S": "0"}) as running:
        client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
        short = msgspec.structs.replace(entry_for(model_dir), model_id=SHORT_MODEL, context_window=SHORT_CONTEXT_WINDOW)
        client.hset(keys.model(SHORT_MODEL), mapping=to_hash(short))
        try:
            yield running
        finally:
            client.delete(keys.model(SHORT_MODEL), keys.model(MODEL))
            client.close()


@pytest.fixture(scope="module")
async def battery(cluster) -> Battery:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        innocent = await _innocent(session, cluster.url)
        greedy = {path: _answer_text(await _post(session, cluster.url, path, body(path))) for path in (COMPLETIONS, CHAT)}
        results, innocents = {}, {}
        for start in range(0, len(CASES), GROUP_SIZE):
            group = CASES[start : start + GROUP_SIZE]
            outcomes = await asyncio.gather(_innocent(session, cluster.url),
                                            *(_run(session, cluster.url, case) for case in group), return_exceptions=True)
            innocents[start // GROUP_SIZE] = outcomes[0]
            results.update(zip((case.id for case in group), outcomes[1:], strict=True))
    return Battery(innocent, greedy, results, innocents)


# -- sending ---------------------------------------------------------------------------------
async def _innocent(session: aiohttp.ClientSession, url: str) -> str:
    result = await _post(session, url, COMPLETIONS, json.dumps(INNOCENT).encode())
    assert result.status == 200, result.text
    return _answer_text(result)


async def _post(session, url: str, path: str, data, headers: dict | None = None, method: str = "POST") -> Result:
    headers = headers or {"Content-Type": "application/json"}
    async with session.request(method, URL(url + path, encoded=True), data=data, headers=headers) as resp:
        return Result(resp.status, dict(resp.headers), await resp.text(errors="replace"))


async def _run(session: aiohttp.ClientSession, url: str, case: Case) -> Result:
    if case.send == "http":
        return await _post(session, url, case.path, case.payload(), case.headers, case.method)
    if case.send in ("chunked", "slow"):
        return await _post(session, url, case.path, _pieces(case), case.headers, case.method)
    if case.send == "drop_midstream":
        return await _drop_midstream(session, url, case)
    num_body_bytes = {"headers_only": 0, "partial_body": len(case.payload()) // 2}.get(case.send, len(case.payload()))
    return await _raw_then_gone(url, case, num_body_bytes)


async def _pieces(case: Case):
    """The body in pieces (chunked transfer encoding); "slow" pauses between three of them."""
    payload = case.payload()
    size = -(-len(payload) // 3) if case.send == "slow" else 64 << 10
    for start in range(0, len(payload), size):
        if case.send == "slow" and start:
            await asyncio.sleep(0.3)  # the client's own pace, not a wait for the server
        yield payload[start : start + size]


async def _raw_then_gone(url: str, case: Case, num_body_bytes: int) -> Result:
    """Headers announcing the whole body, `num_body_bytes` of it, then the connection closes."""
    host, port = URL(url).host, URL(url).port
    payload = case.payload()
    _reader, writer = await asyncio.open_connection(host, port)
    head = (f"{case.method} {case.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    writer.write(head.encode() + payload[:num_body_bytes])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    return Result(None, {}, "")


async def _drop_midstream(session: aiohttp.ClientSession, url: str, case: Case) -> Result:
    """A stream read up to its first event, then the connection closes under it."""
    async with session.post(url + case.path, data=case.payload(), headers=case.headers) as resp:
        first = await resp.content.readline()
        resp.close()
        return Result(resp.status, dict(resp.headers), first.decode(errors="replace"))


# -- checking --------------------------------------------------------------------------------
def _answer_text(result: Result) -> str:
    assert result.status == 200, result.text
    choice = json.loads(result.text)["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _check_error(case: Case, result: Result) -> None:
    assert result.headers.get("Content-Type", "").startswith("application/json"), result.headers
    payload = json.loads(result.text)
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["type"] == case.type, error
    if case.param is not ANY:
        assert error["param"] == case.param, error
    if case.code is not ANY:
        assert error["code"] == case.code, error
    if case.status == 405:
        assert "POST" in result.headers.get("Allow", "") or "GET" in result.headers.get("Allow", ""), result.headers


def _check_answer(case: Case, result: Result, greedy: dict[str, str]) -> None:
    if case.send == "drop_midstream":
        assert result.text.startswith("data: "), result.text
        return
    if result.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = result.text.split("\n\n")
        assert events[-2] == "data: [DONE]" and '"error"' not in result.text, result.text[-500:]
        assert json.loads(events[-3][len("data: "):])["usage"]["completion_tokens"] >= 1
        return
    payload = json.loads(result.text)
    assert payload["usage"]["completion_tokens"] >= 1, payload
    if case.is_greedy:
        assert _answer_text(result) == greedy[case.path], (payload, greedy[case.path])


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_bad_input(case: Case, battery: Battery):
    result = battery.results[case.id]
    assert not isinstance(result, BaseException), f"the client failed: {result!r}"
    assert result.status == case.status, (result.status, result.text[:500])
    if case.status is not None and case.status >= 400:
        _check_error(case, result)
    elif case.status == 200:
        _check_answer(case, result, battery.greedy)
    innocent = battery.innocents[CASES.index(case) // GROUP_SIZE]
    assert innocent == battery.innocent, f"the innocent request beside this case got {innocent!r}"


def test_battery_is_big_enough():
    assert sum(case.status != 200 for case in CASES) >= 150
    assert {case.path for case in CASES} >= {COMPLETIONS, CHAT}


# -- afterwards: nothing left waiting or running -----------------------------------------------
def _gauge_sum(metrics: str, name: str) -> float:
    pattern = rf'^{name}\{{[^}}]*model="{re.escape(MODEL)}"[^}}]*\}} ([0-9.e+-]+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, flags=re.MULTILINE))


async def test_gauges_back_to_zero_after_battery(cluster, battery):
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{cluster.url}/metrics") as resp:
                metrics = await resp.text()
            gauges = [_gauge_sum(metrics, n) for n in ("c2c_requests_waiting", "c2c_requests_running")]
            if gauges == [0, 0] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert re.search(rf'^c2c_requests_waiting\{{model="{re.escape(MODEL)}"\}} 0\.0$', metrics, flags=re.MULTILINE)
    assert gauges == [0, 0], gauges
    assert _gauge_sum(metrics, "c2c_requests_total") > 0
    assert re.search(rf'c2c_requests_total\{{model="{re.escape(MODEL)}",outcome="aborted"\}} [1-9]', metrics)


async def test_worker_aborted_the_vanished_clients_requests(cluster, battery):
    """The worker ends up running nothing and counted the aborts (not 1500 tokens each)."""
    nc = await nats.connect(cluster.nats_url)
    latest: dict[str, WorkerState] = {}

    async def on_telemetry(msg):
        latest["t"] = schemas.decode(WorkerState, msg.data)

    await nc.subscribe(subjects.telemetry(cluster.worker_ids[0]), cb=on_telemetry)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            t = latest.get("t")
            if t is not None and t.num_running == 0 and not t.request_ids and t.num_aborted >= 1:
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    t = latest.get("t")
    assert t is not None and t.num_aborted >= 1 and t.num_running == 0 and not t.request_ids, t


async def test_health_and_ready_with_a_live_worker(cluster, battery):
    async with aiohttp.ClientSession() as session:
        for path, status in (("/health", 200), (f"/ready?model={MODEL}", 200), ("/ready?model=no-such-model", 404)):
            async with session.get(cluster.url + path) as resp:
                assert resp.status == status, (path, await resp.text())
