"""Calls to pipeline stage servers over NATS, from the engine's (synchronous) threads.

`StageClient` owns one NATS connection on an event loop thread of its own; `call`
returns a `concurrent.futures.Future` of the reply (the engine thread waits on it, or
chains the next stage on it). A frame over the NATS max payload goes in parts.

A stage that dies never leaves a call hanging: while a stage has calls out for longer
than `ping_every_s`, it is pinged (answered at once, apart from its compute queue); no
responder or no answer fails all its calls with `StageError`, so does `timeout_s`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import msgspec
import nats

from services import natsutil, subjects
from services.stage_wire import PART_HEADER, PARTS_HEADER, StageCall, StageReply
from worker.pipeline import StageError, StageSpec, wait
from worker.stage_frames import decode_frame, encode_frame, forward_call, split_parts

log = logging.getLogger(__name__)
_PART_MARGIN_BYTES = 4096  # room for the NATS headers under the max payload


@dataclass
class _Call:
    stage_id: str
    future: cf.Future
    sent_s: float
    parts: list[bytes] = field(default_factory=list)


class StageClient:
    def __init__(self, nats_url: str, timeout_s: float = 60.0, ping_every_s: float = 0.5):
        self.timeout_s, self.ping_every_s = timeout_s, ping_every_s
        self._calls: dict[str, _Call] = {}
        self._ids = itertools.count()
        self._loop = natsutil.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stage-client", daemon=True)
        self._thread.start()
        self._nc = self._run(natsutil.connect_nats(nats_url, "c2c-stage-client")).result(30)
        self._inbox = self._nc.new_inbox()
        self._send_lock = asyncio.Lock()
        self._run(self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)).result(10)
        self._watchdog = self._run(self._watch())

    @property
    def max_payload_bytes(self) -> int:
        """The NATS server's max payload: a frame larger than this goes in parts."""
        return self._nc.max_payload

    def _run(self, coro) -> cf.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, stage_id: str, header: StageCall, tensors: dict | None = None) -> cf.Future:
        """A future of (StageReply, {name: tensor}); fails with StageError."""
        frame = encode_frame(header, tensors or {})
        call_id = f"{self._inbox}.{next(self._ids)}"
        future: cf.Future = cf.Future()
        self._loop.call_soon_threadsafe(self._calls.__setitem__, call_id, _Call(stage_id, future, time.monotonic()))
        self._run(self._send(stage_id, call_id, frame))
        return future

    async def _send(self, stage_id: str, call_id: str, frame: bytearray) -> None:
        part_bytes = max(1024, self.max_payload_bytes - _PART_MARGIN_BYTES)
        parts = split_parts(frame, part_bytes)
        try:
            async with self._send_lock:  # a call's parts go out together, calls in order
                for i, part in enumerate(parts):
                    await self._nc.publish(subjects.stage(stage_id), bytes(part), reply=call_id,
                                           headers={PART_HEADER: str(i), PARTS_HEADER: str(len(parts))})
        except (OSError, nats.errors.Error) as exc:
            self._fail(call_id, StageError(f"cannot reach stage {stage_id}: {exc}"))

    async def _on_reply(self, msg) -> None:
        call = self._calls.get(msg.subject)
        if call is None:
            return  # a call that already failed
        if natsutil.is_no_responders(msg):
            self._fail(msg.subject, StageError(f"stage {call.stage_id} has no server"))
            return
        call.parts.append(msg.data)
        if len(call.parts) < int(msg.headers.get(PARTS_HEADER, "1")):
            return
        del self._calls[msg.subject]
        try:
            reply, tensors = decode_frame(StageReply, bytearray(b"".join(call.parts)))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            call.future.set_exception(StageError(f"stage {call.stage_id} sent a bad reply: {exc}"))
            return
        if reply.error:
            call.future.set_exception(StageError(f"stage {call.stage_id}: {reply.error}"))
        else:
            call.future.set_result((reply, tensors))

    def _fail(self, call_id: str, exc: StageError) -> None:
        call = self._calls.pop(call_id, None)
        if call is not None and not call.future.done():
            call.future.set_exception(exc)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.ping_every_s)
            now_s = time.monotonic()
            for call_id, call in list(self._calls.items()):
                if now_s - call.sent_s > self.timeout_s:
                    self._fail(call_id, StageError(f"stage {call.stage_id} took more than {self.timeout_s:.0f} s"))
            waiting = {c.stage_id for c in self._calls.values() if now_s - c.sent_s > self.ping_every_s}
            for stage_id in waiting:
                if not await self._is_alive(stage_id):
                    for call_id in [i for i, c in self._calls.items() if c.stage_id == stage_id]:
                        self._fail(call_id, StageError(f"stage {stage_id} is gone"))

    async def _is_alive(self, stage_id: str) -> bool:
        ping = encode_frame(StageCall("ping"), {})
        try:
            await self._nc.request(subjects.stage(stage_id), bytes(ping), timeout=max(2.0, 4 * self.ping_every_s),
                                   headers={PART_HEADER: "0", PARTS_HEADER: "1"})
            return True
        except (TimeoutError, nats.errors.Error, OSError):
            return False

    def close(self) -> None:
        self._watchdog.cancel()
        self._run(natsutil.close_nats(self._nc)).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class RemoteStage:
    """A stage in a stage server: `load` maps the model's weights there (host store) and
    makes the KV cache of its layers; calls are futures, like a LocalStage's."""

    def __init__(self, client: StageClient, spec: StageSpec, slot_id: str):
        self.client, self.spec, self.slot_id = client, spec, slot_id
        self.kv_key = f"remote:{spec.stage_id}:{slot_id}"

    def load(self, model_dir: str, num_blocks: int, block_size: int, kv_dtype: str, quantize: str) -> None:
        call = StageCall("load", self.slot_id, model_dir, self.spec.start, self.spec.end, num_blocks,
                         block_size, kv_dtype, quantize)
        wait(self.client.call(self.spec.stage_id, call), self.client.timeout_s, f"loading stage {self.kv_key}")

    def forward(self, batch, x) -> cf.Future:
        return _then(self.client.call(self.spec.stage_id, *forward_call(self.slot_id, batch, x)),
                     lambda tensors: tensors["out"])

    def read_kv(self, start: int, end: int, block_ids: list[int]) -> cf.Future:
        call = StageCall("read_kv", self.slot_id, start=start, end=end, block_ids=list(block_ids))
        return _then(self.client.call(self.spec.stage_id, call), lambda tensors: (tensors["k"], tensors["v"]))

    def write_kv(self, start: int, end: int, block_ids: list[int], k, v) -> cf.Future:
        call = StageCall("write_kv", self.slot_id, start=start, end=end, block_ids=list(block_ids))
        return _then(self.client.call(self.spec.stage_id, call, {"k": k, "v": v}), lambda tensors: None)

    def close(self) -> None:
        """Unload it on the server (not waited for: a dead server has nothing to unload)."""
        self.client.call(self.spec.stage_id, StageCall("unload", self.slot_id))


def _then(future: cf.Future, fn) -> cf.Future:
    """A future of fn(tensors) of a call's reply."""
    out: cf.Future = cf.Future()

    def done(f: cf.Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(fn(f.result()[1]))

    future.add_done_callback(done)
    return out
