"""Faults against a real cluster (nats-server, Valkey, gateway, placer, two CPU workers):
a worker paused past its expiry mid-stream, fenced epochs on a worker, a gateway that
vanished. Outputs are greedy and compared with the engine's own: nothing wrong, nothing
twice. Every wait is on an event, with a generous ceiling.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import aiohttp
import msgspec
import nats
import psutil
import pytest
from failover import failover_cluster
from sse import stream_text

from services import schemas, subjects
from services.launcher import LocalCluster
from services.schemas import AbortRequest, SubmitRequest, TokenChunk, WorkerState

PROMPTS = ["The quick brown fox", "Hello, world", "One two three", "Lorem ipsum"]
MAX_TOKENS = 600
WAIT_S = 180.0


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=7)


@pytest.fixture(scope="module")
def cluster(servers, model_dir):
    with failover_cluster([model_dir], servers, num_workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def expected(model_dir, greedy_texts):
    return greedy_texts(model_dir, PROMPTS, MAX_TOKENS)


def _pid_of(worker_id: str) -> int:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "--worker-id" in cmdline and cmdline[cmdline.index("--worker-id") + 1] == worker_id:
            return proc.pid
    raise AssertionError(f"no process for worker {worker_id}")


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M))


async def test_a_paused_worker_adds_no_wrong_or_duplicated_text(cluster, model_dir, expected):
    """SIGSTOP past the expiry: its requests continue elsewhere; after SIGCONT it must
    not add a word to any stream (fencing), and it drops the fenced requests."""
    before = await _metric(cluster.url, "c2c_redispatches_total")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        responses = await asyncio.gather(*[session.post(f"{cluster.url}/v1/completions", json={
            "model": model_dir.name, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}) for p in PROMPTS])
        assert all(r.status == 200 for r in responses)
        paused_id = responses[0].headers["X-Worker-Id"]
        pid = _pid_of(paused_id)
        os.kill(pid, signal.SIGSTOP)
        try:
            await _wait_for(lambda: _metric(cluster.url, "c2c_redispatches_total"), lambda v: v > before)
        finally:
            os.kill(pid, signal.SIGCONT)
        texts = await asyncio.gather(*[stream_text(r) for r in responses])
    for prompt, text in zip(PROMPTS, texts, strict=True):
        assert text == expected[prompt]  # nothing lost, nothing repeated, nothing foreign
    async with _telemetry_of(cluster, paused_id) as telemetry:  # it dropped what was fenced off
        await _wait_for(telemetry.get, lambda t: t.num_running == 0 and not t.request_ids)


async def _wait_for(probe, done, ceiling_s: float = WAIT_S):
    deadline = time.monotonic() + ceiling_s
    while time.monotonic() < deadline:
        value = await probe()
        if done(value):
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached within {ceiling_s:.0f} s (last: {value!r})")


class _Telemetry:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    async def get(self) -> WorkerState:
        return schemas.decode(WorkerState, (await asyncio.wait_for(self.queue.get(), WAIT_S)).data)


class _telemetry_of:
    """async with _telemetry_of(cluster, worker_id) as t: await t.get() -> the next report."""

    def __init__(self, cluster: LocalCluster, worker_id: str):
        self.url = cluster.nats_url
        self.subject = subjects.TELEMETRY_ALL if worker_id == "*" else subjects.telemetry(worker_id)

    async def __aenter__(self) -> _Telemetry:
        self.nc = await nats.connect(self.url)
        telemetry = _Telemetry()
        await self.nc.subscribe(self.subject, cb=telemetry.queue.put)
        return telemetry

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()


class _FakeGateway:
    """Submits straight to one worker and reads its chunks, as a gateway would."""

    def __init__(self, nc, gateway_id: str, worker_id: str):
        self.nc, self.gateway_id, self.worker_id = nc, gateway_id, worker_id
        self.chunks: asyncio.Queue = asyncio.Queue()

    async def start(self) -> _FakeGateway:
        await self.nc.subscribe(subjects.gateway_inbox_all(self.gateway_id), cb=self.chunks.put)
        await self.nc.flush()
        return self

    async def submit(self, req: SubmitRequest) -> None:
        inbox = subjects.gateway_inbox(self.gateway_id, req.request_id)
        await self.nc.publish(subjects.worker_submit(self.worker_id), schemas.encode(req), reply=inbox)

    async def abort(self, abort: AbortRequest) -> None:
        await self.nc.publish(subjects.worker_abort(self.worker_id), schemas.encode(abort))

    async def next_chunk(self) -> TokenChunk:
        """The next chunk with content (a worker's `accepted` acknowledgements are skipped)."""
        while True:
            chunk = schemas.decode(TokenChunk, (await asyncio.wait_for(self.chunks.get(), WAIT_S)).data)
            if not chunk.accepted:
                return chunk


async def test_a_newer_epoch_replaces_the_older_one_on_the_same_worker(cluster, model_dir, expected):
    """A re-dispatch that lands on the worker still running the old epoch (it was only
    slow) replaces it; an abort of the old epoch spares the new one."""
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis_url)
    await redis.set(f"c2c:gateway:gwfence{os.getpid()}", "1", ex=600)
    nc = await nats.connect(cluster.nats_url)
    gateway = await _FakeGateway(nc, f"gwfence{os.getpid()}", cluster.worker_ids[1]).start()
    prompt = PROMPTS[2]
    req = SubmitRequest(request_id=f"fence-{os.getpid()}", model_id=model_dir.name, prompt=prompt,
                        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, epoch=1)
    await gateway.submit(req)
    first = await gateway.next_chunk()
    assert (first.epoch, first.seq) == (1, 0)
    await gateway.submit(msgspec.structs.replace(req, epoch=2))
    await gateway.abort(AbortRequest(req.request_id, "fenced", epoch=1))
    texts, seqs = [], []
    while True:
        chunk = await gateway.next_chunk()
        if chunk.epoch == 2:
            texts.append(chunk.text)
            seqs.append(chunk.seq)
            if chunk.is_final:
                break
    assert seqs == list(range(len(seqs)))  # in order, none missing
    assert "".join(texts) == expected[prompt]
    await nc.close()
    await redis.aclose()


async def test_requests_of_a_vanished_gateway_are_aborted(cluster, model_dir):
    """Nobody reads these chunks (their gateway's key is gone): the worker stops them."""
    nc = await nats.connect(cluster.nats_url)
    worker_id = cluster.worker_ids[0]
    gateway = await _FakeGateway(nc, f"gwgone{os.getpid()}", worker_id).start()  # no c2c:gateway key
    num_requests, max_tokens = 6, 2000 - 16
    async with _telemetry_of(cluster, worker_id) as telemetry:
        aborted_before = (await telemetry.get()).num_aborted
        for i in range(num_requests):
            await gateway.submit(SubmitRequest(request_id=f"orphan-{os.getpid()}-{i}", model_id=model_dir.name,
                                               prompt="x", max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        report = await _wait_for(telemetry.get, lambda t: t.num_aborted > aborted_before and not t.request_ids)
    assert report.num_aborted - aborted_before == num_requests  # stopped, not run to the end
    await nc.close()


async def test_huge_prompts_hurt_no_one(cluster, model_dir, expected):
    """~900 KB prompts are refused (context window) while innocent streams run: the
    innocent answers are exact and no worker was taken for dead (no re-dispatch)."""
    before = await _metric(cluster.url, "c2c_redispatches_total")
    huge = "lorem ipsum dolor sit amet " * 33_000  # ~890 KB, under the bus's message limit
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        innocent = [session.post(f"{cluster.url}/v1/completions", json={
            "model": model_dir.name, "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}) for p in PROMPTS[:2]]
        bad = [session.post(f"{cluster.url}/v1/completions", json={
            "model": model_dir.name, "prompt": huge, "max_tokens": 4}) for _ in range(3)]
        responses = await asyncio.gather(*innocent, *bad)
        texts = await asyncio.gather(*[stream_text(r) for r in responses[:2]])
        for resp in responses[2:]:
            body = await resp.json()
            assert resp.status == 400, body
            assert body["error"]["code"] == "context_length_exceeded"
    assert texts == [expected[p] for p in PROMPTS[:2]]
    assert await _metric(cluster.url, "c2c_redispatches_total") == before


async def test_telemetry_reports_the_measured_prefill_rate(cluster, model_dir):
    """The placer's admission reads these: a live worker must produce them."""
    async with _telemetry_of(cluster, "*") as telemetry, aiohttp.ClientSession() as session:
        for _ in range(4):  # whichever worker the placer picks prefills these
            body = {"model": model_dir.name, "prompt": "seven ravens " * 200, "max_tokens": 1}
            async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
        report = await _wait_for(telemetry.get, lambda t: t.prefill_tokens_per_s > 0, ceiling_s=WAIT_S)
    assert report.queued_prefill_tokens >= 0


def test_a_bug_while_admitting_still_answers_the_client(model_dir):
    """A non-C2C exception in the engine's add_request (run by the Admit command) ends
    that request with an error chunk instead of leaving its client waiting."""
    import queue as queue_mod

    from worker.commands import Submit
    from worker.engine import Engine
    from worker.engine_loop import EngineLoop

    engine = Engine()
    engine.add_model(model_dir.name, model_dir)

    def broken_add_request(*args, **kwargs):
        raise RuntimeError("injected bug")

    engine.add_request = broken_add_request
    sent: queue_mod.SimpleQueue = queue_mod.SimpleQueue()

    class Loop:  # stands in for the asyncio loop: call_soon_threadsafe runs at once
        @staticmethod
        def call_soon_threadsafe(fn, *args):
            fn(*args)

    loop = EngineLoop(engine, "w-test", Loop(), sent.put)
    loop.start()
    try:
        req = SubmitRequest(request_id="bug-1", model_id=model_dir.name, prompt="hi", max_tokens=2, epoch=1)
        loop.submit(Submit(req, "inbox.bug-1"))
        reply, payload = sent.get(timeout=WAIT_S)[0]
        chunk = schemas.decode(TokenChunk, payload)
        assert reply == "inbox.bug-1" and chunk.is_final and chunk.error_code and chunk.epoch == 1
        assert "injected bug" in chunk.error
        assert loop.unfinished() == []
    finally:
        loop.stop()
