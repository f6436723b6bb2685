"""One request's life on the gateway: submit, fenced chunks in order, re-dispatch, abort.

Fencing: every assignment of a request has an epoch (1 for the first submit, +1 for each
re-dispatch). Workers echo it on every chunk with a per-assignment sequence number. A
stream accepts only chunks of its current epoch, from the worker that first answered in
that epoch, in sequence; anything else is dropped. So a worker that was slow, declared
dead and then resumed can never add text, and a chunk lost on the bus (a gap in `seq`)
turns into a re-dispatch with the tokens the client already has instead of wrong text.
A live migration hands an epoch over: the new worker's first chunk names the old one
(`migrated_from`) and continues its sequence, so the switch is accepted only in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from services import natsutil, schemas, subjects
from services.errors import C2CError, ErrorCode, NoCapacity
from services.logutil import request_log
from services.schemas import FinishReason, TokenChunk

if TYPE_CHECKING:
    from gateway.core import GatewayCore
    from gateway.openai_api import ParsedRequest

log = logging.getLogger(__name__)
_ABORT_WAIT_S = 30.0
MAX_REDISPATCHES = 4  # then the request fails instead of bouncing between dying workers
NO_RESPONDERS = "no placer or worker is listening"
# a submit nobody heard (a placer or worker restarting) is tried again after these pauses
NO_RESPONDER_PAUSES_S = (0.25, 0.5, 1.0, 1.0)
ACCEPT_TIMEOUT_S = 5.0  # a worker acknowledges an assignment at once; silence this long: it was lost


def error_of(chunk: TokenChunk) -> C2CError:
    code = ErrorCode(chunk.error_code) if chunk.error_code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
    return C2CError(chunk.error or code.name.lower().replace("_", " "), code=code, param=chunk.error_param or None)


class RequestStream:
    """Submit on enter; `next_chunk()` until a final chunk; abort on exit if unfinished."""

    def __init__(self, core: GatewayCore, req: ParsedRequest):
        self.core = core
        self.m = core.metrics
        self.req = req
        self.rlog = request_log(log, req.request_id)
        self.queue: asyncio.Queue[TokenChunk] = asyncio.Queue()
        self.worker_id = ""  # the current assignment's worker, once it answered
        self.epoch = 1
        self.cold_start = False  # the first chunk's word: this request mapped/loaded its model
        self.finished = False
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.finish_reason = FinishReason.NONE
        self.token_ids: list[int] = []  # generated so far (re-dispatch appends them to the prompt)
        self.num_chars = 0  # text characters received so far
        self.num_redispatches = 0
        self._dropped_epochs: set[int] = set()
        self._next_seq = 0  # the seq the next chunk of this epoch must carry
        self._is_accepted = False  # a chunk of the current epoch came (its submit was not lost)
        self._start_s = time.monotonic()
        self._deadline_s = self._start_s + core.config.request_timeout_s
        self._last_s = self._start_s
        self._got_first = False
        self._is_waiting = False  # the waiting gauge was raised for this request
        self._counted_worker = ""  # the worker label the running gauge was raised for

    # -- enter / exit ----------------------------------------------------------------------
    async def __aenter__(self) -> RequestStream:
        if not self.core.is_connected:
            raise NoCapacity("the message bus is unavailable; retry shortly")
        payload = schemas.encode(self._submit())  # before any state: a bad value raises here
        self.core.streams[self.req.request_id] = self
        self.m.child(self.m.waiting, self.req.model).inc()
        self._is_waiting = True
        try:
            await self._publish_submit(payload)
        except BaseException:
            self._release()
            raise
        self.rlog.debug("submitted model=%s stream=%s", self.req.model, self.req.stream)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self.finished:
            self._release()
            return
        self.m.child(self.m.requests, self.req.model, "aborted").inc()
        self._release_gauges()
        self.core.spawn(self._abort(), "abort")

    def _release_gauges(self) -> None:
        if self._counted_worker:
            self.m.child(self.m.running, self.req.model, self._counted_worker).dec()
            self._counted_worker = ""
        if self._is_waiting:
            self.m.child(self.m.waiting, self.req.model).dec()
            self._is_waiting = False

    def _release(self) -> None:
        self._release_gauges()
        if self.core.streams.get(self.req.request_id) is self:
            del self.core.streams[self.req.request_id]

    def _submit(self) -> schemas.SubmitRequest:
        submit = self.req.submit
        if self.epoch == 1:
            return msgspec.structs.replace(submit, epoch=1)
        return msgspec.structs.replace(submit, worker_id="", epoch=self.epoch, resumed_token_ids=list(self.token_ids),
                                       resumed_num_chars=self.num_chars)

    async def _publish_submit(self, payload: bytes) -> None:
        inbox = subjects.gateway_inbox(self.core.gateway_id, self.req.request_id)
        await self.core.nc.publish(subjects.SUBMIT, payload, reply=inbox)

    # -- chunks ------------------------------------------------------------------------------
    def deliver(self, chunk: TokenChunk) -> None:
        """Called by the core's inbox subscription (any epoch; filtered when taken)."""
        self.queue.put_nowait(chunk)

    def no_responders(self) -> None:
        """The bus had nobody for our submit: try again shortly (within the re-dispatch budget)."""
        self.deliver(TokenChunk(self.req.request_id, redispatch=True, epoch=self.epoch, error=NO_RESPONDERS))

    def local_error(self, code: ErrorCode, message: str) -> TokenChunk:
        """A final error chunk made here (no worker): it ends the current epoch as it is."""
        return TokenChunk(self.req.request_id, finish_reason=FinishReason.ERROR, error_code=code, error=message,
                          epoch=self.epoch)

    async def next_chunk(self) -> TokenChunk:
        """The next accepted chunk; raises C2CError(TIMEOUT) when the workers go quiet or
        the request's deadline passes, NO_CAPACITY after too many re-dispatches."""
        while True:
            timeout_s, is_accept_wait = self._timeout_s()
            try:
                chunk = await self._get(timeout_s)
            except TimeoutError:
                if not is_accept_wait:
                    await self._give_up(timeout_s)
                await self._redispatch(f"no worker took epoch {self.epoch} within {ACCEPT_TIMEOUT_S:.0f} s")
                continue
            if not self._is_current(chunk):
                continue
            self._is_accepted = True
            if chunk.accepted:
                self.worker_id = self.worker_id or chunk.worker_id
                continue
            if chunk.redispatch and chunk.error == NO_RESPONDERS:
                await self._redispatch(NO_RESPONDERS, pause_s=NO_RESPONDER_PAUSES_S[min(self.num_redispatches, 3)])
            elif chunk.redispatch:
                await self._redispatch(f"worker {chunk.worker_id or '?'} left mid-request")
            elif chunk.seq != self._next_seq and chunk.worker_id:  # (placer and local errors: no seq)
                await self._redispatch(f"chunks lost on the bus (got #{chunk.seq}, expected #{self._next_seq})")
            else:
                self._next_seq += 1
                self._account(chunk)
                return chunk

    def _is_current(self, chunk: TokenChunk) -> bool:
        """Of this epoch, and from the worker that first answered in it (fencing)."""
        if chunk.epoch != self.epoch:
            if chunk.epoch not in self._dropped_epochs:  # once per epoch: a fenced worker may go on a while
                self._dropped_epochs.add(chunk.epoch)
                self.rlog.info("dropping chunks of epoch %d from worker %s (current epoch %d)",
                               chunk.epoch, chunk.worker_id, self.epoch)
            return False
        if self.worker_id and chunk.migrated_from == self.worker_id and chunk.worker_id != self.worker_id:
            self._migrated(chunk)  # in sequence, or a gap that next_chunk turns into a re-dispatch
            return True
        if self.worker_id and chunk.worker_id and chunk.worker_id != self.worker_id:
            self.rlog.warning("dropped a chunk from worker %s: epoch %d is assigned to %s",
                              chunk.worker_id, self.epoch, self.worker_id)
            return False
        return True

    def _migrated(self, chunk: TokenChunk) -> None:
        """The current worker handed this epoch over (live migration): the chunks go on, in
        sequence, from the worker it moved to; the old one stopped before it acknowledged."""
        self.rlog.info("moved from worker %s to %s at chunk #%d", self.worker_id, chunk.worker_id, chunk.seq)
        self.worker_id = chunk.worker_id
        if self._counted_worker:
            self.m.child(self.m.running, self.req.model, self._counted_worker).dec()
            self._counted_worker = ""
        self.m.child(self.m.migrations, self.req.model).inc()

    def _timeout_s(self) -> tuple[float, bool]:
        """How long to wait for the next chunk, and whether running out means the
        assignment was lost (no worker acknowledged it) rather than a timeout."""
        config = self.core.config
        per_chunk_s = config.chunk_timeout_s if self._got_first else config.first_chunk_timeout_s
        left_s = self._deadline_s - time.monotonic()
        if not self._is_accepted and ACCEPT_TIMEOUT_S < min(per_chunk_s, left_s):
            return ACCEPT_TIMEOUT_S, True
        return max(0.0, min(per_chunk_s, left_s)), False

    async def _get(self, timeout_s: float) -> TokenChunk:
        """The next queued chunk; no timer when one is already there (the streaming case)."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        async with asyncio.timeout(timeout_s):
            return await self.queue.get()

    async def _give_up(self, timeout_s: float) -> None:
        self.finished = True  # nothing more will come; the abort below fences the worker
        self._release()
        self.m.child(self.m.requests, self.req.model, "timeout").inc()
        await self._send_abort("gateway timeout")
        if time.monotonic() >= self._deadline_s:
            raise C2CError(f"the request did not finish within its deadline of "
                           f"{self.core.config.request_timeout_s:.0f} s", code=ErrorCode.TIMEOUT)
        raise C2CError(f"no response from the workers within {timeout_s:.0f} s", code=ErrorCode.TIMEOUT)

    async def _redispatch(self, why: str, pause_s: float = 0.0) -> None:
        """Fence the current assignment off and submit again with the tokens the client has."""
        if self.num_redispatches >= MAX_REDISPATCHES:
            raise NoCapacity(f"{why}; gave up after {self.num_redispatches} re-dispatches")
        await self._send_abort("re-dispatched")
        await asyncio.sleep(pause_s)
        self.num_redispatches += 1
        self.epoch += 1
        self._next_seq = 0
        self._is_accepted = False
        self.worker_id = ""
        if self._counted_worker:
            self.m.child(self.m.running, self.req.model, self._counted_worker).dec()
            self._counted_worker = ""
        self.m.child(self.m.redispatches, self.req.model).inc()
        await self._publish_submit(schemas.encode(self._submit()))
        self.rlog.warning("%s: resubmitted as epoch %d with %d tokens already streamed",
                          why, self.epoch, len(self.token_ids))

    async def _send_abort(self, reason: str) -> None:
        if not self.worker_id:
            return
        abort = schemas.AbortRequest(self.req.request_id, reason, epoch=self.epoch)
        try:
            await self.core.nc.publish(subjects.worker_abort(self.worker_id), schemas.encode(abort))
        except natsutil.IO_ERRORS as exc:
            self.rlog.warning("could not send the abort to worker %s: %s", self.worker_id, exc)

    async def _abort(self) -> None:
        """The client went away: abort on the worker; if none answered yet, wait for it."""
        try:
            async with asyncio.timeout(_ABORT_WAIT_S):
                while not self.worker_id:
                    chunk = await self.queue.get()
                    if chunk.epoch == self.epoch and chunk.worker_id and not chunk.redispatch:
                        if chunk.is_final:
                            return
                        self.worker_id = chunk.worker_id
            await self._send_abort("client disconnected")
            self.rlog.info("client went away: abort sent to worker %s", self.worker_id)
        except TimeoutError:
            self.rlog.warning("client went away; no worker ever answered")
        finally:
            if self.core.streams.get(self.req.request_id) is self:
                del self.core.streams[self.req.request_id]

    # -- accounting ------------------------------------------------------------------------
    def _account(self, chunk: TokenChunk) -> None:
        m, now = self.m, time.monotonic()
        if chunk.worker_id:
            self.worker_id = chunk.worker_id
        if self.worker_id and not self._counted_worker and not chunk.is_final:
            self._counted_worker = self.worker_id
            m.child(m.running, self.req.model, self.worker_id).inc()
        if not self._got_first:
            self._first_chunk(chunk, now)
        elif chunk.token_ids:
            m.child(m.itl_s, self.req.model, self.worker_id).observe(now - self._last_s)
        self._last_s = now
        self.num_chars += len(chunk.text)
        if chunk.num_resumed_tokens:  # the rest of the streamed tokens are generated again
            del self.token_ids[chunk.num_resumed_tokens :]
        if chunk.token_ids:
            self.token_ids += chunk.token_ids
            m.child(m.tokens, self.req.model, self.worker_id).inc(len(chunk.token_ids))
        if chunk.is_final:
            self._finish(chunk, now)

    def _first_chunk(self, chunk: TokenChunk, now: float) -> None:
        m = self.m
        self._got_first = True
        if self._is_waiting:
            m.child(m.waiting, self.req.model).dec()
            self._is_waiting = False
        if chunk.error_code == 0:
            m.child(m.ttft_s, self.req.model, self.worker_id).observe(now - self._start_s)
            m.child(m.queue_s, self.req.model, self.worker_id).observe(chunk.queue_s)
        self.cold_start = chunk.cold_start
        if chunk.cold_start:
            m.child(m.cold_starts, self.req.model, self.worker_id).inc()

    def _finish(self, chunk: TokenChunk, now: float) -> None:
        m = self.m
        self.finished = True
        self.finish_reason = chunk.finish_reason
        self.num_prompt_tokens = chunk.num_prompt_tokens
        self.num_generated_tokens = chunk.num_generated_tokens
        outcome = "error" if chunk.finish_reason == FinishReason.ERROR else "ok"
        m.child(m.requests, self.req.model, outcome).inc()
        if outcome == "ok":
            m.child(m.e2e_s, self.req.model, self.worker_id).observe(now - self._start_s)
        self.rlog.info("finished worker=%s epoch=%d reason=%s prompt=%d generated=%d in %.1f ms",
                       self.worker_id, self.epoch, chunk.finish_reason.name.lower(), chunk.num_prompt_tokens,
                       chunk.num_generated_tokens, (now - self._start_s) * 1e3)
