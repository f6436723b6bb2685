"""End to end: real nats-server + Redis, gateway, placer, controller and two CPU workers
as subprocesses (LocalCluster), tiny random models; the official `openai` client and raw
HTTP. Greedy outputs must equal the engine's own direct output on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import aiohttp
import nats
import pytest
import redis.asyncio as aioredis

from controller.service import Controller
from services import keys, schemas, subjects
from services.config import ControllerConfig
from services.embedded import EmbeddedServers
from services.launcher import LocalCluster
from services.schemas import (
    ControlUpdate,
    FinishReason,
    ResidencyAction,
    ResidencyCommand,
    SubmitRequest,
    TokenChunk,
    WorkerState,
)

openai = pytest.importorskip("openai")

PROMPTS = ["The quick brown fox", "Hello, world"]
CHAT = [{"role": "user", "content": "Say something"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def models(tiny_model):
    return {"llama": tiny_model("llama"), "qwen2": tiny_model("qwen2", seed=1)}


@pytest.fixture(scope="module")
def cluster(servers, models):
    # the placer's forecast prewarming is off here (tests/test_placer_prewarm.py covers it):
    # tests below evict and map models themselves
    with LocalCluster(list(models.values()), num_workers=2, nats_url=servers.nats_url,
                      redis_url=servers.redis_url, extra_env={"C2C_WORKER_EXPIRY_S": "2", "C2C_PREWARM_INTERVAL_S": "0"}) as running:
        yield running


@pytest.fixture(scope="module")
def expected(models):
    """Greedy outputs of the engine called directly, per (model, prompt or 'chat')."""
    from worker.engine import Engine, SamplingParams

    engine = Engine()
    out = {}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    for model_dir in models.values():
        engine.add_model(model_dir.name, model_dir)
        for prompt in PROMPTS:
            out[model_dir.name, prompt] = engine.generate(model_dir.name, prompt, params)
        out[model_dir.name, "chat"] = engine.generate(model_dir.name, None, params, messages=CHAT)
    return out


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_services_do_not_import_torch():
    code = "import gateway.service, placer.service, controller.service, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_listed(client, models):
    ids = {m.id for m in client.models.list().data}
    assert {d.name for d in models.values()} <= ids


async def test_prewarm_maps_a_model_before_any_request(cluster, models):
    worker_id, model_id = cluster.worker_ids[1], models["qwen2"].name
    nc = await nats.connect(cluster.nats_url)
    try:
        assert model_id not in (await _telemetry(nc, 0.3))[worker_id].models  # nothing served yet
        command = ResidencyCommand(worker_id, ResidencyAction.PREWARM, model_id)
        await nc.publish(subjects.worker_residency(worker_id), schemas.encode(command))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if model_id in (await _telemetry(nc, 0.2)).get(worker_id, WorkerState(worker_id)).models:
                break
        assert model_id in (await _telemetry(nc, 0.3))[worker_id].models
    finally:
        await nc.close()


def test_completions_match_engine(client, models, expected):
    for model_dir in models.values():
        for prompt in PROMPTS:
            want = expected[model_dir.name, prompt]
            got = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert got.choices[0].text == want.new_text
            assert got.choices[0].finish_reason == want.finish_reason
            assert got.usage.completion_tokens == want.num_generated_tokens
            assert got.usage.prompt_tokens == want.num_prompt_tokens
            assert got.usage.total_tokens == want.num_prompt_tokens + want.num_generated_tokens


def test_streaming_completion_matches_engine(client, models, expected):
    model_id = models["llama"].name
    want = expected[model_id, PROMPTS[0]]
    stream = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.new_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.num_generated_tokens


def test_chat_matches_engine_stream_and_not(client, models, expected):
    model_id = models["qwen2"].name
    want = expected[model_id, "chat"]
    full = client.chat.completions.create(model=model_id, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == want.new_text
    assert full.usage.prompt_tokens == want.num_prompt_tokens
    chunks = list(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.new_text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


async def test_raw_sse_wire_format(cluster, models, expected):
    model_id = models["llama"].name
    body = {"model": model_id, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            request_id, worker_id = resp.headers["X-Request-Id"], resp.headers["X-Worker-Id"]
            raw = (await resp.read()).decode()
    await _assert_assignment_recorded(cluster, request_id, worker_id)
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    objs = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    for obj in objs:
        assert set(obj) == {"id", "object", "created", "model", "choices"}
        assert obj["object"] == "text_completion" and obj["model"] == model_id
        assert set(obj["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert "".join(o["choices"][0]["text"] for o in objs) == expected[model_id, PROMPTS[1]].new_text
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def _assert_assignment_recorded(cluster, request_id: str, worker_id: str) -> None:
    """The placer writes c2c:req:<id> in the background, shortly after routing."""
    redis = aioredis.from_url(cluster.redis_url, decode_responses=True)
    try:
        for _ in range(40):
            record = await redis.hgetall(keys.request(request_id))
            if record:
                break
            await asyncio.sleep(0.05)
        assert record["worker_id"] == worker_id and record["reply"].endswith(request_id)
        assert 0 < await redis.ttl(keys.request(request_id)) <= 600
    finally:
        await redis.aclose()


async def _request_on_worker(nc, worker_id: str, model_id: str, prompt: str) -> str:
    """Submit straight to one worker over NATS; the concatenated text of its chunks."""
    req = SubmitRequest(f"direct-{model_id}-{time.monotonic_ns()}", model_id, prompt=prompt,
                        max_tokens=MAX_TOKENS, temperature=0.0)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.worker_submit(worker_id), schemas.encode(req), reply=inbox)
    parts = []
    while True:
        chunk = schemas.decode(TokenChunk, (await sub.next_msg(timeout=30)).data)
        assert chunk.error_code == 0, chunk.error
        parts.append(chunk.text)
        if chunk.finish_reason != FinishReason.NONE:
            break
    await sub.unsubscribe()
    return "".join(parts)


async def test_two_models_alternate_on_one_worker(cluster, models, expected):
    nc = await nats.connect(cluster.nats_url)
    try:
        worker_id = cluster.worker_ids[0]
        for _ in range(2):
            for model_dir in models.values():
                text = await _request_on_worker(nc, worker_id, model_dir.name, PROMPTS[0])
                assert text == expected[model_dir.name, PROMPTS[0]].new_text
    finally:
        await nc.close()


async def _telemetry(nc, duration_s: float) -> dict[str, WorkerState]:
    latest: dict[str, WorkerState] = {}

    async def on_msg(msg):
        t = schemas.decode(WorkerState, msg.data)
        latest[t.worker_id] = t

    sub = await nc.subscribe(subjects.TELEMETRY_ALL, cb=on_msg)
    await asyncio.sleep(duration_s)
    await sub.unsubscribe()
    return latest


async def test_client_disconnect_aborts_on_worker(cluster, models):
    nc = await nats.connect(cluster.nats_url)
    try:
        before = await _telemetry(nc, 0.5)
        body = {"model": models["llama"].name, "prompt": "tell me everything", "max_tokens": 1900,
                "ignore_eos": True, "temperature": 0, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.content.readline()  # the first event: it is running
        # the connection is closed: the worker must abort, not generate 1900 tokens
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = await _telemetry(nc, 0.3)
            aborted = sum(t.num_aborted for t in after.values()) - sum(t.num_aborted for t in before.values())
            if aborted >= 1 and all(t.num_running == 0 for t in after.values()):
                break
        assert aborted >= 1, "the worker never saw the abort"
        assert all(t.num_running == 0 and not t.request_ids for t in after.values())
    finally:
        await nc.close()
    metrics = await _metrics(cluster)
    assert re.search(r'c2c_requests_total\{model="[^"]+",outcome="aborted"\} [1-9]', metrics)


async def _metrics(cluster) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/metrics") as resp:
            return await resp.text()


def _cold_starts(metrics: str, model_id: str, worker_id: str) -> float:
    found = re.search(rf'c2c_cold_starts_total\{{model="{model_id}",worker="{worker_id}"\}} ([0-9.]+)', metrics)
    return float(found.group(1)) if found else 0.0


async def _evict_everywhere(cluster, model_id: str) -> None:
    """EVICT on every worker, then wait until no telemetry lists the model as mapped."""
    nc = await nats.connect(cluster.nats_url)
    try:
        for worker_id in cluster.worker_ids:
            command = ResidencyCommand(worker_id, ResidencyAction.EVICT, model_id)
            await nc.publish(subjects.worker_residency(worker_id), schemas.encode(command))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not any(model_id in t.models for t in (await _telemetry(nc, 0.3)).values()):
                return
        raise AssertionError(f"{model_id} still mapped after EVICT")
    finally:
        await nc.close()


async def test_cold_start_header_agrees_with_the_metrics(cluster, models):
    model_id = models["llama"].name
    await _evict_everywhere(cluster, model_id)
    seen = []
    async with aiohttp.ClientSession() as session:
        for stream in (True, False, True):
            before = await _metrics(cluster)
            body = {"model": model_id, "prompt": "cold?", "max_tokens": 2, "stream": stream}
            async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                worker_id, cold = resp.headers["X-Worker-Id"], resp.headers["X-Cold-Start"]
                await resp.read()
            added = _cold_starts(await _metrics(cluster), model_id, worker_id) - _cold_starts(before, model_id, worker_id)
            assert cold in ("true", "false") and added == (1.0 if cold == "true" else 0.0)
            seen.append(cold)
    assert seen[0] == "true"  # evicted everywhere: the first request maps the model again


async def test_two_workers_share_load(cluster, models):
    body = {"model": models["qwen2"].name, "prompt": "load", "max_tokens": 24, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async def one():
            async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()

        await asyncio.gather(*(one() for _ in range(8)))
    metrics = await _metrics(cluster)
    served = {w for w in cluster.worker_ids
              if re.search(rf'c2c_e2e_request_latency_seconds_count\{{model="[^"]+",worker="{w}"\}} [1-9]', metrics)}
    assert served == set(cluster.worker_ids), metrics[-2000:]


async def test_bad_inputs_get_errors_and_service_continues(cluster, models):
    model_id = models["llama"].name
    url = f"{cluster.url}/v1/completions"
    async with aiohttp.ClientSession() as session:
        cases = [
            ({"data": b"{oops", "headers": {"Content-Type": "application/json"}}, 400, None),
            ({"json": {"model": model_id, "prompt": "x", "temperature": "warm"}}, 400, None),
            ({"json": {"model": model_id, "prompt": "x", "logit_bias": {"frobnicate": 1}}}, 400, None),
            ({"json": {"model": "nope", "prompt": "x"}}, 404, "model_not_found"),
            ({"json": {"model": model_id, "prompt": "word " * 2500}}, 400, "context_length_exceeded"),
            ({"json": {"model": model_id, "prompt": "word " * 2500, "stream": True}}, 400, "context_length_exceeded"),
        ]
        for kwargs, status, code in cases:
            async with session.post(url, **kwargs) as resp:
                body = await resp.json()
                assert resp.status == status, body
                assert body["error"]["code"] == code and body["error"]["message"]
        async with session.post(url, json={"model": model_id, "prompt": "still alive", "max_tokens": 2}) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] >= 1


# Keep this test last in the module: it kills one of the cluster's two workers.
async def test_stream_survives_worker_death(cluster, models):
    from worker.engine import Engine, SamplingParams

    model_dir = models["llama"]
    max_tokens = 300
    engine = Engine()
    engine.add_model(model_dir.name, model_dir)
    want = engine.generate(model_dir.name, PROMPTS[0],
                           SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    body = {"model": model_dir.name, "prompt": PROMPTS[0], "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    texts = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            cluster.kill(resp.headers["X-Worker-Id"])  # mid-request: the stream has just begun
            async for line in resp.content:
                line = line.decode().strip()
                if line.startswith("data: {"):
                    event = json.loads(line.removeprefix("data: "))
                    if event["choices"]:
                        texts.append(event["choices"][0]["text"])
                    else:
                        usage = event["usage"]
    assert "".join(texts) == want.new_text  # nothing lost, nothing repeated
    assert usage["completion_tokens"] == max_tokens
    assert usage["prompt_tokens"] == want.num_prompt_tokens
    pattern = rf'c2c_redispatches_total\{{model="{model_dir.name}"\}} 1\.0'
    assert re.search(pattern, await _metrics(cluster))


async def test_stream_survives_graceful_worker_stop(cluster, models):
    """A worker told to stop moves its unfinished requests to another worker (or hands them back)."""
    from worker.engine import Engine, SamplingParams

    extra_id = f"{cluster.worker_ids[0]}-extra"
    extra = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "worker", "--device", "cpu", "--worker-id", extra_id],
        env={**cluster.env(), "C2C_WORKER_EXPIRY_S": "2"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        redis = aioredis.from_url(cluster.redis_url, decode_responses=True)
        for _ in range(600):
            if await redis.exists(keys.worker(extra_id)):
                break
            await asyncio.sleep(0.1)
        await redis.aclose()
        await asyncio.sleep(0.3)  # its telemetry reaches the placer
        model_dir = models["qwen2"]
        engine = Engine()
        engine.add_model(model_dir.name, model_dir)
        want = engine.generate(model_dir.name, PROMPTS[1], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        body = {"model": model_dir.name, "prompt": PROMPTS[1], "max_tokens": 200, "ignore_eos": True,
                "temperature": 0, "stream": True}
        texts = []
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                started = time.monotonic()
                if resp.headers["X-Worker-Id"] == extra_id:
                    extra.send_signal(signal.SIGTERM)
                else:
                    cluster.kill(resp.headers["X-Worker-Id"], signal.SIGTERM)
                async for line in resp.content:
                    line = line.decode().strip()
                    if line.startswith("data: {"):
                        texts.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
        assert "".join(texts) == want.new_text
        assert time.monotonic() - started < 15
        # it really left the stopped worker: moved with its KV (drain by live migration) or
        # handed back for re-dispatch, exactly once
        text = await _metrics(cluster)
        moves = [name for name in ("c2c_migrations_total", "c2c_redispatches_total")
                 if re.search(rf'{name}\{{model="{model_dir.name}"\}} 1\.0', text)]
        assert len(moves) == 1, moves
    finally:
        if extra.poll() is None:
            extra.kill()
        extra.wait()


async def test_controller_answers_slow_telemetry_with_control_update():
    with EmbeddedServers() as servers:  # private: the cluster's own controller must not answer
        controller = Controller(ControllerConfig(nats_url=servers.nats_url, redis_url=servers.redis_url,
                                                 tpot_slo_ms=50.0))
        await controller.start()
        nc = await nats.connect(servers.nats_url)
        redis = aioredis.from_url(servers.redis_url, decode_responses=True)
        try:
            sub = await nc.subscribe(subjects.control("ctl-w0"))
            slow = WorkerState("ctl-w0", num_running=8, num_waiting=4, tpot_p50_ms=500.0, ttft_p50_ms=100.0)
            await nc.publish(subjects.telemetry("ctl-w0"), schemas.encode(slow))
            update = schemas.decode(ControlUpdate, (await sub.next_msg(timeout=5)).data)
            assert update.worker_id == "ctl-w0"
            assert update.chunk_size is not None and update.chunk_size < 256  # TPOT over SLO: smaller chunks
            stored = {}
            for _ in range(50):
                stored = await redis.hgetall(keys.control("ctl-w0"))
                if stored:
                    break
                await asyncio.sleep(0.05)
            assert int(stored["chunk_size"]) == update.chunk_size
        finally:
            await redis.aclose()
            await nc.close()
            await controller.stop()
