"""The worker's compute loop: one thread that owns the Engine, apart from the NATS loop.

The asyncio side puts commands on `commands` (a thread-safe queue); this thread runs
engine steps and hands encoded `TokenChunk`s back with `loop.call_soon_threadsafe`.
Only this thread touches the engine. A request that fails (at admission or in a step)
always gets a final chunk with an error code.

Every chunk carries its assignment's epoch and its index in that assignment (`seq`): the
gateway accepts only the current epoch, in sequence (fencing). A submit of a request
that runs here under an older epoch replaces it (the gateway re-dispatched it, maybe to
this very worker); an abort names the epoch it fences off and spares newer ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services import schemas
from services.errors import C2CError, ErrorCode
from services.schemas import (
    FINISH_REASON_FROM_TEXT,
    FinishReason,
    SubmitRequest,
    TokenChunk,
    TokenLogprob,
    WorkerState,
)
from worker.admission import Admission
from worker.commands import (
    Abort,
    AddModel,
    Admit,
    Call,
    Command,
    Control,
    Evict,
    Prewarm,
    Reconfigure,
    Submit,
    Wake,
)
from worker.state import StateMeter

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05
_STATS_EVERY_S = 0.05
ENGINE_KNOBS = ("chunk_size", "max_num_seqs", "max_num_batched_tokens", "decode_threshold", "rho")


@dataclass
class _Inflight:
    reply: str
    arrival_s: float  # wall clock at the gateway
    received_s: float  # monotonic, on this worker
    epoch: int = 0  # the gateway's assignment counter, echoed on every chunk
    num_chunks: int = 0  # chunks sent so far: the next one's seq
    last_token_s: float = 0.0
    num_resumed: int = 0  # re-dispatched: tokens generated elsewhere, now part of the prompt
    num_skip_chars: int = 0  # re-dispatched: text the client already has, dropped once
    model_id: str = ""
    prompt_text: str = ""  # echo: sent on the first chunk
    ttft_slo_ms: float = 0.0  # its targets (services/slo.py), for the worker's tightest
    tpot_slo_ms: float = 0.0
    migrated_from: str = ""  # moved here (live migration): named on the first chunk sent from here


class EngineLoop:
    def __init__(self, engine, worker_id: str, loop: asyncio.AbstractEventLoop,
                 publish: Callable[[list[tuple[str, bytes]]], None], template: WorkerState | None = None):
        self.engine = engine
        self.worker_id = worker_id
        self.loop = loop
        self.publish = publish  # called in the asyncio loop with [(subject, payload)]
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.meter = StateMeter(template or WorkerState(worker_id))
        self.state = self.meter.template  # the latest record: written by this thread, read by telemetry
        self.private_weight_bytes = 0  # "load" mode: weights copied into this process
        self._inflight: dict[str, _Inflight] = {}
        self._ttft_ms: deque[float] = deque(maxlen=64)
        self._tpot_ms: deque[float] = deque(maxlen=256)
        self._num_finished = 0
        self._num_aborted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{worker_id}", daemon=True)
        self._last_stats_s = 0.0
        self._busy_since_s: float | None = None  # monotonic start of the step or command running now
        self._step_s = 0.0  # time spent in steps since start (prefill throughput = tokens / this)
        self._last_rate_sample = (0, 0.0)  # (prefill tokens, step seconds) at the last snapshot
        self._prefill_tokens_per_s = 0.0  # moving average over snapshots that prefilled
        self._aborted: set[str] = set()  # requests whose engine abort output is still to come (not theirs)
        # request id -> (epoch, reply, monotonic time received) while its prompt is prepared
        self._preparing: dict[str, tuple[int, str, float]] = {}
        self.admission = Admission(engine, worker_id, lambda *done: self.commands.put(Admit(*done)))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop after the current step; a step stuck longer than timeout_s is left behind
        (the thread is a daemon; its late chunks carry a fenced-off epoch)."""
        self._stop.set()
        self.admission.stop()
        self.commands.put(Wake())
        self._thread.join(timeout=timeout_s)

    def stalled_s(self) -> float:
        """How long the step or command running now has taken (0 when idle): any thread."""
        since_s = self._busy_since_s
        return 0.0 if since_s is None else time.monotonic() - since_s


    def submit(self, command: Command) -> None:
        """Thread-safe: a `worker.commands.Command`, handled in order by the engine thread."""
        self.commands.put(command)

    # ---- the thread --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._step()
                self._maybe_snapshot()
            except Exception as exc:  # the loop must outlive any bug; clients still hear
                log.exception("engine loop error")
                self._fail_all(f"engine loop error: {exc}")

    def unfinished(self) -> list[tuple[str, str, int]]:
        """(request id, reply inbox, epoch) of requests in flight or being prepared (a copy: any thread)."""
        preparing = [(request_id, reply, epoch) for request_id, (epoch, reply, _) in list(self._preparing.items())]
        return preparing + [(request_id, info.reply, info.epoch) for request_id, info in list(self._inflight.items())]

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=_IDLE_WAIT_S) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: Command) -> None:
        self._busy_since_s = time.monotonic()
        try:
            match command:
                case Submit(req, reply):
                    self._add_request(req, reply)
                case Admit(req, reply, prepared):
                    self._admit(req, reply, prepared)
                case Abort(request_id, epoch):
                    self._abort(request_id, epoch)
                case Control(knobs):
                    self.engine.set_control(**{k: v for k, v in knobs.items() if k in ENGINE_KNOBS})
                case AddModel(model_id, path):
                    if not self.engine.has_model(model_id):
                        self.engine.add_model(model_id, path)
                case Prewarm(model_id, path):
                    self._prewarm(model_id, path)
                case Evict(model_id):
                    self._evict(model_id)
                case Call(fn, done):
                    self._call(fn, done)
                case Reconfigure(model_id, specs, nats_url):
                    self.engine.reconfigure(model_id, list(specs), nats_url)
        except C2CError as exc:
            log.warning("%s failed: %s", type(command).__name__, exc)
        except Exception as exc:  # a bug here must not kill the loop nor leave a client waiting
            log.exception("%s failed", type(command).__name__)
            if isinstance(command, Submit | Admit):  # the engine's add_request runs in Admit
                req, reply = command.req, command.reply
                self._preparing.pop(req.request_id, None)
                self._inflight.pop(req.request_id, None)
                self._send([(reply, _error_chunk(req.request_id, self.worker_id, ErrorCode.INTERNAL, str(exc), req.epoch))])
        finally:
            self._busy_since_s = None

    def _call(self, fn, done) -> None:
        try:
            result = fn(self)
        except Exception as exc:  # the caller hears it; the loop goes on
            done(None, exc)
        else:
            done(result, None)

    async def call(self, fn):
        """fn(self) on the engine thread, between steps; its result (or exception) here."""
        future = self.loop.create_future()

        def settle(result, exc) -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        self.submit(Call(fn, lambda result, exc: self.loop.call_soon_threadsafe(settle, result, exc)))
        return await future

    # live migration (engine thread, through `call`): a request's chunk state leaves and arrives
    def take_inflight(self, request_id: str) -> _Inflight | None:
        return self._inflight.pop(request_id, None)

    def restore_inflight(self, request_id: str, info: _Inflight) -> None:
        self._inflight[request_id] = info

    def adopt(self, commit, source_worker_id: str) -> None:
        """A request migrated here: its chunks go on in the source's epoch and sequence."""
        now_s = time.monotonic()
        self._inflight[commit.request.request_id] = _Inflight(
            commit.reply, commit.arrival_s, now_s, epoch=commit.epoch, num_chunks=commit.seq, last_token_s=now_s,
            num_resumed=commit.num_resumed, num_skip_chars=commit.num_skip_chars, model_id=commit.request.model_id,
            ttft_slo_ms=commit.ttft_slo_ms, tpot_slo_ms=commit.tpot_slo_ms, migrated_from=source_worker_id)

    def _prewarm(self, model_id: str, model_dir: str) -> None:
        """Resident in the host store and mapped on this slice before any request."""
        if not self.engine.has_model(model_id):
            self.engine.add_model(model_id, model_dir, preload=True)
        else:
            self.engine.prewarm(model_id)
        log.info("prewarmed %s", model_id)

    def _evict(self, model_id: str) -> None:
        """Unmap (host) or free (load) a model; refused while its requests run."""
        if self.engine.evict(model_id):
            log.info("evicted %s", model_id)
        else:
            log.info("evict %s refused: requests of it are running", model_id)

    def _add_request(self, req: SubmitRequest, reply: str) -> None:
        """A submit: its prompt is prepared off this thread, then `_admit` adds it."""
        if not self._replace_older(req):
            return
        self._preparing[req.request_id] = (req.epoch, reply, time.monotonic())
        self.admission.submit(req, reply)

    def _admit(self, req: SubmitRequest, reply: str, prepared) -> None:
        """The prompt is ready (or refused): add the request unless it was aborted or
        replaced by a newer epoch meanwhile."""
        from worker.engine import SamplingParams

        pending = self._preparing.get(req.request_id)
        if pending is None or pending[0] != req.epoch:
            return
        del self._preparing[req.request_id]
        try:
            if isinstance(prepared, C2CError):
                raise prepared
            params = SamplingParams(
                max_tokens=max(1, req.max_tokens - prepared.num_resumed), temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=list(req.stop),
                stop_token_ids=list(req.stop_token_ids), ignore_eos=req.ignore_eos,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, logit_bias=dict(req.logit_bias),
                min_tokens=req.min_tokens, num_resumed_tokens=prepared.num_resumed,
                logprobs=req.logprobs if req.logprobs >= 0 else None, json_schema=req.json_schema or None,
            )
            self.engine.add_request(req.request_id, req.model_id, params=params, arrival_s=req.arrival_s or None,
                                    prompt_token_ids=prepared.token_ids, tenant=req.tenant,
                                    ttft_slo_s=req.ttft_slo_ms / 1000.0 or None, tpot_slo_s=req.tpot_slo_ms / 1000.0 or None)
        except C2CError as exc:
            log.info("[req=%s] rejected: %s", req.request_id, exc)
            self._send([(reply, _error_chunk(req.request_id, self.worker_id, exc.code, str(exc), req.epoch,
                                             param=exc.param or ""))])
            return
        self._inflight[req.request_id] = _Inflight(reply, req.arrival_s, pending[2], epoch=req.epoch,
                                                   num_resumed=prepared.num_resumed,
                                                   num_skip_chars=prepared.num_skip_chars,
                                                   model_id=req.model_id, ttft_slo_ms=req.ttft_slo_ms,
                                                   tpot_slo_ms=req.tpot_slo_ms)
        if req.echo and not prepared.num_resumed:
            tokenizer = self.engine.tokenizer(req.model_id)
            self._inflight[req.request_id].prompt_text = tokenizer.decode(prepared.token_ids, skip_special_tokens=False)

    def _replace_older(self, req: SubmitRequest) -> bool:
        """A request here under an older epoch (running or being prepared) gives way to
        this one; a submit of an epoch not newer is a duplicate and is dropped."""
        running = self._inflight.get(req.request_id)
        pending = self._preparing.get(req.request_id)
        newest = max(([running.epoch] if running else []) + ([pending[0]] if pending else []), default=None)
        if newest is not None and req.epoch <= newest:
            log.warning("[req=%s] dropped a duplicate submit of epoch %d (epoch %d is here)",
                        req.request_id, req.epoch, newest)
            return False
        if running is not None:
            log.info("[req=%s] epoch %d replaces epoch %d here", req.request_id, req.epoch, running.epoch)
            self.engine.abort(req.request_id)  # its "abort" output comes from the next step: not ours
            self._aborted.add(req.request_id)
            del self._inflight[req.request_id]
        return True

    def _abort(self, request_id: str, epoch: int = 0) -> None:
        pending = self._preparing.get(request_id)
        if pending is not None and (not epoch or pending[0] <= epoch):
            del self._preparing[request_id]  # its prompt, once ready, is dropped
            self._num_aborted += 1
            log.info("[req=%s] aborted while its prompt was prepared (epoch %d)", request_id, pending[0])
        info = self._inflight.get(request_id)
        if info is None or (epoch and info.epoch > epoch):  # a newer assignment is not fenced
            return
        self.engine.abort(request_id)  # its output comes from the next step, maybe after a new epoch
        self._aborted.add(request_id)
        del self._inflight[request_id]
        self._num_aborted += 1
        log.info("[req=%s] aborted (epoch %d)", request_id, info.epoch)

    def _step(self) -> None:
        step_start_s = self._busy_since_s = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug in a step must not leave clients waiting
            log.exception("engine step failed; failing %d requests", len(self._inflight))
            self._fail_all(f"engine step failed: {exc}")
            return
        finally:
            self._busy_since_s = None
            step_s = time.monotonic() - step_start_s
            self._step_s += step_s
            model_id, self.engine.last_step_model = self.engine.last_step_model, None
            self.meter.on_step(model_id, step_s, self.engine.step_read_bytes(model_id))
        batch = [self._chunk_of(out, step_start_s) for out in outputs if self._is_ours(out)]
        if batch:
            self._send(batch)

    def _is_ours(self, out) -> bool:
        """An output of a request in flight, not the abort output of an epoch aborted or replaced."""
        if out.request_id in self._aborted and out.finished and out.finish_reason == "abort":
            self._aborted.discard(out.request_id)
            return False
        return out.request_id in self._inflight

    def _chunk_of(self, out, step_start_s: float) -> tuple[str, bytes]:
        info = self._inflight[out.request_id]
        now_s = time.monotonic()
        chunk = TokenChunk(out.request_id, self.worker_id, list(out.new_token_ids), out.new_text,
                           epoch=info.epoch, seq=info.num_chunks)
        if info.num_skip_chars:  # re-dispatched: the client has this text already
            skipped = min(info.num_skip_chars, len(chunk.text))
            chunk.text, info.num_skip_chars = chunk.text[skipped:], info.num_skip_chars - skipped
        chunk.migrated_from, info.migrated_from = info.migrated_from, ""
        if getattr(out, "logprobs", None):
            chunk.logprobs = self._token_logprobs(info.model_id, out.logprobs)
        if info.num_chunks == 0:
            chunk.prompt_text = info.prompt_text
            chunk.num_resumed_tokens = info.num_resumed
            chunk.cold_start = bool(getattr(out, "cold_start", False))
            chunk.queue_s = max(0.0, step_start_s - info.received_s)
            self._ttft_ms.append(max(0.0, time.time() - info.arrival_s) * 1e3)
        elif out.new_token_ids:
            self._tpot_ms.append((now_s - info.last_token_s) * 1e3 / len(out.new_token_ids))
        info.num_chunks += 1
        if out.new_token_ids:
            info.last_token_s = now_s
        if out.finished:
            self._finish(chunk, out, info)
        return info.reply, schemas.encode(chunk)

    def _token_logprobs(self, model_id: str, logprobs: list) -> list[TokenLogprob]:
        """The engine's logprobs with each token as its text (decoded alone, as vLLM does)."""
        tokenizer = self.engine.tokenizer(model_id)

        def text(token_id: int) -> str:
            return tokenizer.decode([token_id], skip_special_tokens=False)

        return [TokenLogprob(lp.token_id, text(lp.token_id), lp.logprob, list(lp.top_token_ids),
                             [text(t) for t in lp.top_token_ids], list(lp.top_logprobs)) for lp in logprobs]

    def _finish(self, chunk: TokenChunk, out, info: _Inflight) -> None:
        self._inflight.pop(out.request_id, None)
        self._num_finished += 1
        chunk.finish_reason = FINISH_REASON_FROM_TEXT.get(out.finish_reason or "stop", FinishReason.STOP)
        chunk.num_prompt_tokens = out.num_prompt_tokens - info.num_resumed
        chunk.num_generated_tokens = out.num_generated_tokens + info.num_resumed
        if chunk.finish_reason == FinishReason.ERROR or out.error:
            chunk.finish_reason = FinishReason.ERROR
            chunk.error_code = out.error_code or ErrorCode.INTERNAL
            chunk.error = out.error or "the engine failed on this request"

    def _fail_all(self, message: str) -> None:
        batch = []
        for request_id, info in list(self._inflight.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine is already broken; the client must still hear
                log.exception("[req=%s] abort after a failed step failed", request_id)
            batch.append((info.reply, _error_chunk(request_id, self.worker_id, ErrorCode.INTERNAL, message,
                                                   info.epoch, info.num_chunks)))
        self._inflight.clear()
        self._send(batch)

    def _send(self, batch: list[tuple[str, bytes]]) -> None:
        self.loop.call_soon_threadsafe(self.publish, batch)

    def _maybe_snapshot(self) -> None:
        """The worker's state record, from the engine's counters and the requests in flight."""
        now_s = time.monotonic()
        if now_s - self._last_stats_s < _STATS_EVERY_S:
            return
        self._last_stats_s = now_s
        stats = self.engine.stats()
        self._measure_prefill(int(_stat(stats, "num_prefill_tokens", 0)))
        per_model = _stat(stats, "per_model", {}) or {}
        mapped = [m for m, st in per_model.items() if _stat(st, "is_loaded", True)]
        with_work = [m for m, st in per_model.items() if _stat(st, "num_running", 0) + _stat(st, "num_waiting", 0)]
        self.private_weight_bytes = int(_stat(stats, "private_weight_bytes", 0))
        cached = dict(_stat(stats, "cached_fraction", {}) or {})
        self.state = self.meter.build(
            with_work, t_s=time.time(), models=mapped, cached_fraction={m: cached.get(m, 0.0) for m in mapped},
            num_running=int(_stat(stats, "num_running", 0)), num_waiting=int(_stat(stats, "num_waiting", 0)),
            max_num_seqs=int(_stat(stats, "max_num_seqs", self.meter.template.max_num_seqs)),
            kv_free_frac=1.0 - float(_stat(stats, "kv_used_frac", 0.0)),
            ttft_p50_ms=statistics.median(self._ttft_ms) if self._ttft_ms else None,
            tpot_p50_ms=statistics.median(self._tpot_ms) if self._tpot_ms else None,
            num_finished=self._num_finished, num_aborted=self._num_aborted,
            request_ids=[*self._preparing, *self._inflight],
            request_epochs=[p[0] for p in self._preparing.values()] + [i.epoch for i in self._inflight.values()],
            queued_prefill_tokens=int(_stat(stats, "num_queued_prefill_tokens", 0)),
            prefill_tokens_per_s=self._prefill_tokens_per_s, oldest_wait_ms=self._oldest_wait_ms(now_s),
            ttft_slo_ms=min((i.ttft_slo_ms for i in self._inflight.values() if i.ttft_slo_ms > 0), default=0.0),
            tpot_slo_ms=min((i.tpot_slo_ms for i in self._inflight.values() if i.tpot_slo_ms > 0), default=0.0),
            active_models=with_work,
            **{field: int(_stat(stats, name, 0)) for field, name in _KV_TIER_STATS},
        )

    def _oldest_wait_ms(self, now_s: float) -> float | None:
        """Age of the oldest request here without its first token (None: there is none)."""
        received = [p[2] for p in self._preparing.values()]
        received += [i.received_s for i in self._inflight.values() if i.last_token_s == 0.0]
        return 1000.0 * (now_s - min(received)) if received else None

    def _measure_prefill(self, num_prefill_tokens: int) -> None:
        """Prefill tokens per second of step time, averaged over the windows that prefilled."""
        last_tokens, last_step_s = self._last_rate_sample
        num_tokens, step_s = num_prefill_tokens - last_tokens, self._step_s - last_step_s
        self._last_rate_sample = (num_prefill_tokens, self._step_s)
        if num_tokens > 0 and step_s > 0:
            rate = num_tokens / step_s
            old = self._prefill_tokens_per_s
            self._prefill_tokens_per_s = rate if old == 0 else 0.7 * old + 0.3 * rate


_KV_TIER_STATS = (  # WorkerState field <- EngineStats field
    ("kv_device_blocks_used", "kv_device_blocks_used"), ("kv_host_blocks_used", "kv_host_blocks_used"),
    ("kv_swaps_out", "num_swaps_out"), ("kv_swaps_in", "num_swaps_in"),
    ("kv_swap_out_bytes", "swap_out_bytes"), ("kv_swap_in_bytes", "swap_in_bytes"),
    ("kv_rotation_stalls", "num_rotation_stalls"),
)


def _stat(stats: Any, name: str, default: Any) -> Any:
    if isinstance(stats, dict):
        return stats.get(name, default)
    return getattr(stats, name, default)


def _error_chunk(request_id: str, worker_id: str, code: int, message: str, epoch: int, seq: int = 0,
                 param: str = "") -> bytes:
    return schemas.encode(TokenChunk(request_id, worker_id, finish_reason=FinishReason.ERROR, error_code=int(code),
                                     error=message, epoch=epoch, seq=seq, error_param=param))
