"""Admission at a real placer (real NATS and Redis): a request that every slice would keep
waiting past `max_queue_wait_s` (queued prefill / measured prefill rate, from the worker's
telemetry) is refused at once with NO_CAPACITY, so overload degrades into fast 503s."""

from __future__ import annotations

import asyncio

import nats
import pytest

from placer.service import Placer
from services import schemas, subjects
from services.config import PlacerConfig
from services.embedded import EmbeddedServers
from services.errors import ErrorCode
from services.schemas import FinishReason, SubmitRequest, TokenChunk, WorkerState

WAIT_S = 60


@pytest.fixture
async def placer_and_bus():
    with EmbeddedServers() as servers:
        placer = Placer(PlacerConfig(nats_url=servers.nats_url, redis_url=servers.redis_url, max_queue_wait_s=5.0,
                                     prewarm_interval_s=0))
        await placer.start()
        nc = await nats.connect(servers.nats_url)
        yield placer, nc
        await nc.close()
        await placer.stop()


async def _report(placer, nc, queued_tokens: int, tokens_per_s: float) -> None:
    t = WorkerState("w-busy", node="n", models=["m"], cached_fraction={"m": 1.0},
                        queued_prefill_tokens=queued_tokens, prefill_tokens_per_s=tokens_per_s)
    await nc.publish(subjects.telemetry("w-busy"), schemas.encode(t))
    await nc.flush()
    for _ in range(WAIT_S * 20):  # until the placer has taken this report in
        view = placer.views.get("w-busy")
        if view is not None and view.queued_prefill_tokens == queued_tokens:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the placer never saw the telemetry")


async def _submit(nc) -> tuple[str, bytes]:
    """Submit as a gateway; returns where the placer sent it (a worker or our inbox)."""
    inbox, worker_sub = nc.new_inbox(), await nc.subscribe(subjects.worker_submit("w-busy"))
    reply_sub = await nc.subscribe(inbox)
    req = SubmitRequest(request_id="r1", model_id="m", prompt="hi", epoch=1)
    await nc.publish(subjects.SUBMIT, schemas.encode(req), reply=inbox)
    done, _ = await asyncio.wait([asyncio.ensure_future(worker_sub.next_msg(WAIT_S)),
                                  asyncio.ensure_future(reply_sub.next_msg(WAIT_S))],
                                 return_when=asyncio.FIRST_COMPLETED)
    msg = done.pop().result()
    await worker_sub.unsubscribe()
    await reply_sub.unsubscribe()
    return ("worker" if msg.subject.startswith("c2c.worker.") else "inbox"), msg.data


async def test_a_slice_with_a_short_backlog_takes_the_request(placer_and_bus):
    placer, nc = placer_and_bus
    await _report(placer, nc, queued_tokens=400, tokens_per_s=1000.0)  # 0.4 s queued
    where, _ = await _submit(nc)
    assert where == "worker"


async def test_a_backlog_past_the_limit_is_refused_at_once(placer_and_bus):
    placer, nc = placer_and_bus
    await _report(placer, nc, queued_tokens=60_000, tokens_per_s=1000.0)  # 60 s queued > 5 s
    where, data = await _submit(nc)
    assert where == "inbox"
    chunk = schemas.decode(TokenChunk, data)
    assert chunk.finish_reason == FinishReason.ERROR and chunk.error_code == ErrorCode.NO_CAPACITY
    assert chunk.epoch == 1 and "queued" in chunk.error
