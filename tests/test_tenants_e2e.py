"""Tenants end to end: a LocalCluster (real NATS + Valkey, gateway, placer, one CPU worker)
started with a tenants file, called through the official `openai` client and raw HTTP.

Isolation both ways (404 bodies identical to an unknown model's), keys (401), requests and
tokens per minute tripping to 429 with Retry-After and recovering, concurrency enforced and
released after client disconnects, usage equal to the responses' usage, reload on SIGHUP,
bad files refused at start, and fair sharing of the one slice under one tenant's burst.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import msgspec
import nats
import pytest

from services import schemas, subjects
from services.embedded import free_port
from services.launcher import LocalCluster
from worker.synth import synth_model

openai = pytest.importorskip("openai")

NUM_SLOTS = 8  # the worker's batch slots (the placer queues at most 4x this on it)
NUM_BURST = 28
RUN = uuid.uuid4().hex[:6]  # tenant names and keys of this run (the Valkey is the session's)
KEYS = {name: f"sk-{name}-{RUN}" for name in ("a", "b", "rl", "tok", "conc", "late")}


def _tenants(models: dict[str, str], with_late: bool = False) -> dict:
    def tenant(name: str, owned: list[str], **limits) -> dict:
        return {"name": f"{name}-{RUN}", "api_keys": [KEYS[name]], "models": owned, "limits": limits}

    doc = {"tenants": [
        tenant("a", [models["a"]]),
        tenant("b", [models["b"]]),
        tenant("rl", [], requests_per_minute=10),
        tenant("tok", [], tokens_per_minute=120),
        tenant("conc", [], max_concurrent=2),
    ]}
    if with_late:
        doc["tenants"].append(tenant("late", []))
    return doc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenant-models")
    dirs = {"a": root / f"acme-private-{RUN}", "b": root / f"bolt-private-{RUN}", "pub": root / f"shared-{RUN}"}
    for seed, path in enumerate(dirs.values()):
        synth_model("llama", "tiny", path, seed=20 + seed)
    return dirs


@pytest.fixture(scope="module")
def model_ids(models):
    return {key: path.name for key, path in models.items()}


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory, model_ids):
    path = tmp_path_factory.mktemp("tenants") / "tenants.json"
    path.write_text(json.dumps(_tenants(model_ids)))
    return path


@pytest.fixture(scope="module")
def cluster(servers, models, tenants_file):
    env = {
        "C2C_PREWARM_INTERVAL_S": "0",
        "C2C_MAX_NUM_SEQS": str(NUM_SLOTS),  # a small slice: a burst makes a queue
        "C2C_TENANTS_REFRESH_S": "3600",  # reloads in these tests come from SIGHUP only
        # the concurrency test pauses the worker: nobody may declare it dead meanwhile
        "C2C_WORKER_EXPIRY_S": "120", "C2C_HEARTBEAT_TTL_S": "120", "C2C_STALL_TIMEOUT_S": "120",
    }
    cluster = LocalCluster(list(models.values()), num_workers=1, nats_url=servers.nats_url,
                           redis_url=servers.redis_url, extra_env=env, tenants_file=tenants_file)
    with cluster.start(timeout_s=300) as running:  # a generous ceiling: the machine may be busy
        # the controller moves the batch cap (and with it the placer's queue cap): without it
        # the slice keeps NUM_SLOTS slots, so the fairness test knows there is a queue
        running.kill("controller", signal.SIGTERM)
        yield running


def client_of(cluster, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=KEYS[name], max_retries=0, timeout=120)


def _raw(cluster, method: str, path: str, key: str | None, body: dict | None = None) -> tuple[int, dict, dict]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{cluster.url}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _usage(cluster, name: str) -> dict:
    status, _, body = _raw(cluster, "GET", "/v1/usage", KEYS[name])
    assert status == 200, body
    return body


def _wait_for(predicate, what: str, ceiling_s: float = 60.0, every_s: float = 0.1):
    deadline = time.monotonic() + ceiling_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


# -- keys and isolation ------------------------------------------------------------------------
def test_models_list_only_own_and_public(cluster, model_ids):
    listed_a = {m.id: m.owned_by for m in client_of(cluster, "a").models.list().data}
    listed_b = {m.id: m.owned_by for m in client_of(cluster, "b").models.list().data}
    ours = set(model_ids.values())  # the session's Redis also holds other tests' public models
    assert {k: v for k, v in listed_a.items() if k in ours} == {model_ids["a"]: f"a-{RUN}", model_ids["pub"]: "public"}
    assert {k: v for k, v in listed_b.items() if k in ours} == {model_ids["b"]: f"b-{RUN}", model_ids["pub"]: "public"}
    for listed in (listed_a, listed_b):  # whatever else is listed is public
        assert all(owner == "public" for k, owner in listed.items() if k not in ours)


def test_wrong_or_missing_key_is_401(cluster, model_ids):
    bad = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.completions.create(model=model_ids["pub"], prompt="Hi", max_tokens=2)
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, _, body = _raw(cluster, "GET", "/v1/models", None)
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_private_models_answer_404_like_unknown_ones_both_ways(cluster, model_ids):
    unknown = f"no-such-model-{RUN}"
    for caller, other in (("a", "b"), ("b", "a")):
        body = {"model": model_ids[other], "prompt": "Hi", "max_tokens": 2}
        status_private, _, private = _raw(cluster, "POST", "/v1/completions", KEYS[caller], body)
        status_unknown, _, missing = _raw(cluster, "POST", "/v1/completions", KEYS[caller], {**body, "model": unknown})
        assert status_private == status_unknown == 404
        assert json.dumps(private).replace(model_ids[other], "M") == json.dumps(missing).replace(unknown, "M")
        chat = {"model": model_ids[other], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert _raw(cluster, "POST", "/v1/chat/completions", KEYS[caller], chat)[0] == 404
        with pytest.raises(openai.NotFoundError):
            client_of(cluster, caller).completions.create(model=model_ids[other], prompt="Hi", max_tokens=2)
        # its own and the public model answer
        own = client_of(cluster, caller).completions.create(model=model_ids[caller], prompt="Hi", max_tokens=2)
        assert own.usage.completion_tokens >= 1
        shared = client_of(cluster, caller).completions.create(model=model_ids["pub"], prompt="Hi", max_tokens=2)
        assert shared.usage.completion_tokens >= 1


# -- usage ---------------------------------------------------------------------------------------
def _model_usage(usage: dict, model_id: str) -> dict:
    row = next((r for r in usage["data"] if r["model"] == model_id), None)
    return row or {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_usage_equals_the_sum_of_responses_usage(cluster, model_ids):
    client = client_of(cluster, "a")
    before = {m: _model_usage(_usage(cluster, "a"), model_ids[m]) for m in ("a", "pub")}
    sums = {m: [0, 0, 0] for m in ("a", "pub")}  # requests, prompt, completion
    for m in ("a", "pub", "a"):
        got = client.completions.create(model=model_ids[m], prompt="Count: one two", max_tokens=5, temperature=0)
        sums[m] = [sums[m][0] + 1, sums[m][1] + got.usage.prompt_tokens, sums[m][2] + got.usage.completion_tokens]
    chat = client.chat.completions.create(model=model_ids["pub"], messages=[{"role": "user", "content": "Hey"}],
                                          max_tokens=4, temperature=0)
    sums["pub"] = [sums["pub"][0] + 1, sums["pub"][1] + chat.usage.prompt_tokens,
                   sums["pub"][2] + chat.usage.completion_tokens]
    stream = client.completions.create(model=model_ids["a"], prompt="Stream it", max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    streamed = [c.usage for c in stream if c.usage is not None][-1]
    sums["a"] = [sums["a"][0] + 1, sums["a"][1] + streamed.prompt_tokens, sums["a"][2] + streamed.completion_tokens]

    def delta_matches() -> bool:
        usage = _usage(cluster, "a")
        for m in ("a", "pub"):
            after = _model_usage(usage, model_ids[m])
            got = [after[k] - before[m][k] for k in ("requests", "prompt_tokens", "completion_tokens")]
            if got != sums[m]:
                return False
        return True

    _wait_for(delta_matches, "the usage endpoint to count every response", ceiling_s=30)
    usage = _usage(cluster, "a")
    assert usage["tenant"] == f"a-{RUN}" and usage["object"] == "usage"
    assert usage["total"]["total_tokens"] == usage["total"]["prompt_tokens"] + usage["total"]["completion_tokens"]
    assert all(r["model"] != model_ids["b"] for r in _usage(cluster, "b")["data"] if r["requests"] == 0)
    metrics = asyncio.run(_get_text(f"{cluster.url}/metrics"))
    assert re.search(rf'c2c_tenant_prompt_tokens_total\{{model="{model_ids["a"]}",tenant="a-{RUN}"\}} [1-9]', metrics)
    assert re.search(rf'c2c_tenant_requests_total\{{model="{model_ids["pub"]}",outcome="ok",tenant="a-{RUN}"\}}',
                     metrics)


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return await resp.text()


# -- limits --------------------------------------------------------------------------------------
def _until_limited(client, model_id: str, max_tokens: int, ceiling: int) -> tuple[int, openai.RateLimitError]:
    for num_ok in range(ceiling):
        try:
            client.completions.create(model=model_id, prompt="Hello there", max_tokens=max_tokens, temperature=0)
        except openai.RateLimitError as exc:
            return num_ok, exc
    raise AssertionError(f"no 429 after {ceiling} requests")


def _retry_after(exc: openai.RateLimitError) -> int:
    return int(exc.response.headers["Retry-After"])


def _recovers(client, model_id: str, exc: openai.RateLimitError, ceiling_s: float = 90) -> None:
    """Wait as Retry-After says, then the request passes (again if it said so again)."""
    deadline = time.monotonic() + ceiling_s
    while True:
        time.sleep(_retry_after(exc))  # what the server asked for
        try:
            client.completions.create(model=model_id, prompt="Hello there", max_tokens=2, temperature=0)
            return
        except openai.RateLimitError as again:
            exc = again
            assert time.monotonic() < deadline, "never recovered from 429"


def test_requests_per_minute_trips_to_429_and_recovers(cluster, model_ids):
    client = client_of(cluster, "rl")
    num_ok, exc = _until_limited(client, model_ids["pub"], 1, ceiling=40)
    assert num_ok >= 10  # the bucket holds one minute's worth
    assert exc.status_code == 429
    assert 1 <= _retry_after(exc) <= 6  # one request refills in 60 / 10 s
    error = exc.response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert "requests per min (RPM): Limit 10" in error["message"]
    _recovers(client, model_ids["pub"], exc)


def test_tokens_per_minute_trips_to_429_and_recovers(cluster, model_ids):
    client = client_of(cluster, "tok")
    num_ok, exc = _until_limited(client, model_ids["pub"], 8, ceiling=40)
    assert num_ok >= 2
    error = exc.response.json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert "tokens per min (TPM): Limit 120" in error["message"]
    assert _retry_after(exc) >= 1
    _recovers(client, model_ids["pub"], exc)


def test_no_limit_leaks_into_another_tenant(cluster, model_ids):
    # rl and tok are (or were) over their limits; a and b never were
    assert client_of(cluster, "b").completions.create(model=model_ids["pub"], prompt="Hi", max_tokens=1)


async def test_max_concurrent_is_enforced_and_released_after_disconnects(cluster, model_ids):
    body = {"model": model_ids["pub"], "prompt": "tell me everything", "max_tokens": 1900, "ignore_eos": True,
            "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS['conc']}"}
    worker_pid = cluster.pid(cluster.worker_ids[0])
    async with aiohttp.ClientSession() as session:
        streams = []
        try:
            for _ in range(2):
                resp = await session.post(f"{cluster.url}/v1/completions", json=body, headers=headers)
                streams.append(resp)
                assert resp.status == 200
                await resp.content.readline()  # its first event: it runs
            os.kill(worker_pid, signal.SIGSTOP)  # both stay open, whatever the machine's speed
            async with session.post(f"{cluster.url}/v1/completions", json={**body, "stream": False},
                                    headers=headers) as third:
                assert third.status == 429
                assert int(third.headers["Retry-After"]) >= 1
                error = (await third.json())["error"]
                assert error["code"] == "rate_limit_exceeded"
                assert "concurrent requests: Limit 2, In flight 2" in error["message"]
            assert _usage(cluster, "conc")["in_flight"] == 2
        finally:
            for resp in streams:
                resp.close()  # the client goes away mid-stream
    try:
        await asyncio.to_thread(_wait_for, lambda: _usage(cluster, "conc")["in_flight"] == 0,
                                "the slots of the disconnected streams", 60)
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    client = client_of(cluster, "conc")
    got = await asyncio.to_thread(client.completions.create, model=model_ids["pub"], prompt="Hi", max_tokens=2)
    assert got.usage.completion_tokens >= 1
    assert _usage(cluster, "conc")["in_flight"] == 0  # released after a normal end too


# -- fairness ------------------------------------------------------------------------------------
async def _worker_load(nc) -> tuple[int, int]:
    """(running, waiting) on the cluster's one worker, from its next telemetry message."""
    state_type = getattr(schemas, "WorkerState", None) or schemas.WorkerTelemetry
    sub = await nc.subscribe(subjects.TELEMETRY_ALL)
    try:
        msg = await sub.next_msg(timeout=10)
        state = msgspec.msgpack.decode(msg.data, type=state_type)
        return state.num_running, state.num_waiting
    finally:
        await sub.unsubscribe()


async def test_one_tenants_burst_does_not_starve_another(cluster, model_ids):
    """Tenant a floods the slice (8 batch slots) with 28 requests, then b sends 2: b's
    requests get the next free slots instead of waiting behind a's whole backlog."""
    client_a = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=KEYS["a"], max_retries=0, timeout=300)
    client_b = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=KEYS["b"], max_retries=0, timeout=300)
    first_token_s: dict[str, float] = {}
    num_done = 0

    async def run(client, name: str, max_tokens: int) -> None:
        nonlocal num_done
        stream = await client.completions.create(model=model_ids["pub"], prompt=f"Story {name}:",
                                                 max_tokens=max_tokens, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and name not in first_token_s:
                first_token_s[name] = time.monotonic()
        first_token_s.setdefault(name, time.monotonic())
        num_done += 1

    nc = await nats.connect(cluster.nats_url)
    try:
        flood = [asyncio.create_task(run(client_a, f"a{i}", 600)) for i in range(NUM_BURST)]
        deadline = time.monotonic() + 120
        while sum(load := await _worker_load(nc)) + num_done < NUM_BURST:  # all of a's are on the worker
            assert time.monotonic() < deadline, "a's burst never reached the worker"
        assert load[1] >= 12, f"no queue to jump: {load} running, waiting"
        await asyncio.gather(run(client_b, "b0", 4), run(client_b, "b1", 4))
        await asyncio.gather(*flood)
    finally:
        await nc.close()
    b_last_s = max(first_token_s["b0"], first_token_s["b1"])
    num_a_after_b = sum(1 for name, t in first_token_s.items() if name.startswith("a") and t > b_last_s)
    # deadline order alone would serve all of a's before b (they came first): 0 here
    assert num_a_after_b >= 10, f"only {num_a_after_b} of a's {NUM_BURST} requests started after b's"


# -- reload and bad files ------------------------------------------------------------------------
def _models_status(cluster, name: str) -> int:
    return _raw(cluster, "GET", "/v1/models", KEYS[name])[0]


def test_reload_on_sighup_and_a_bad_edit_keeps_the_last_good_set(cluster, tenants_file, model_ids):
    gateway_pid = cluster.pid("gateway")
    assert _models_status(cluster, "late") == 401
    original = tenants_file.read_text()
    try:
        tenants_file.write_text(json.dumps(_tenants(model_ids, with_late=True)))
        os.kill(gateway_pid, signal.SIGHUP)
        _wait_for(lambda: _models_status(cluster, "late") == 200, "the new tenant's key to work", 30)
        tenants_file.write_text('{"tenants": [{"name": "broken", "api_keys": "not-a-list"}]}')
        os.kill(gateway_pid, signal.SIGHUP)
        _wait_for(lambda: "api_keys: must be a list" in cluster.log_tail("gateway", 50),
                  "the gateway to log the bad file", 30)
        assert _models_status(cluster, "late") == 200 and _models_status(cluster, "a") == 200
    finally:
        tenants_file.write_text(original)
        os.kill(gateway_pid, signal.SIGHUP)
    _wait_for(lambda: _models_status(cluster, "late") == 401, "the removed tenant's key to stop working", 30)


def test_a_gateway_refuses_to_start_with_a_bad_tenants_file(servers, tmp_path):
    bad = tmp_path / "tenants.yaml"
    bad.write_text("tenants:\n  - name: ok\n    api_keys: [k1]\n  - name: two\n    api_keys: [k2]\n"
                   "    limits: {tokens_per_minute: lots}\n")
    cmd = [sys.executable, "-m", "services.cli", "gateway", "--tenants", str(bad), "--port", str(free_port()),
           "--nats-url", servers.nats_url, "--redis-url", servers.redis_url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "tenants[1] ('two'): limits.tokens_per_minute: must be a positive integer" in done.stderr
    missing = [sys.executable, "-m", "services.cli", "up", "--tenants", str(tmp_path / "nope.json")]
    done = subprocess.run(missing, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nope.json: cannot read it" in done.stderr
