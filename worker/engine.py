"""The inference engine of one worker slice: several models, continuous batching.

One `step()` is three calls, like nano-vllm: `scheduler.schedule()` (pure: which model,
which sequences, how many tokens each), `runner.run(batch)` (tensors: forward + sample),
`scheduler.postprocess(...)` then the engine's own stop checks and detokenization.

Failures: bad input raises `InvalidRequest` / `ContextLengthExceeded` / `ModelNotFound`
from `add_request` and nothing is queued; an exception inside a step fails that model's
running requests (finish_reason "error", with the message) and the engine keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import ContextLengthExceeded, ErrorCode, InvalidRequest, ModelNotFound
from worker.checkpoint import load_config
from worker.sampling import check_params
from worker.scheduler import Scheduler, SchedulerConfig
from worker.sequence import Sequence
from worker.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)
MiB = 1024 * 1024


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 16            # batch cap
    max_num_batched_tokens: int = 512 # token budget per step
    chunk_size: int = 256             # prefill chunk (runtime knob)
    kv_cache_bytes: int = 256 * MiB   # per model
    residency: str = "host"           # "host" | "load"
    load_budget_bytes: int | None = None   # "load": private weight memory, LRU
    host_store_root: str | None = None
    num_threads: int | None = None    # torch threads; None = every core this process may use
    device: str = "cpu"               # "cpu" | "cuda": GEMMs through HybridGEMM on the slice's GPU
    device_cache_bytes: int = 0       # "cuda": slice memory for cached weight tiles (knob rho)


@dataclass
class RequestOutput:
    request_id: str
    model_id: str
    new_token_ids: list[int]
    new_text: str                     # incremental, never splits a UTF-8 character
    finished: bool
    finish_reason: str | None         # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generated_tokens: int
    error: str | None = None
    error_code: int = 0               # services.errors.ErrorCode
    cold_start: bool = False          # this request triggered a model load/map


@dataclass
class ModelStats:
    num_running: int
    num_waiting: int
    kv_used_frac: float
    is_loaded: bool


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_used_frac: float               # the fullest model's KV cache
    per_model: dict[str, ModelStats]
    num_steps: int = 0
    num_prefill_tokens: int = 0       # totals since start
    num_decode_tokens: int = 0
    num_preemptions: int = 0
    private_weight_bytes: int = 0     # "load": weights copied into this process (host: 0)
    cached_fraction: dict[str, float] = field(default_factory=dict)  # loaded model -> achieved ρ


@dataclass
class _Request:
    """What the engine keeps per request beside its Sequence: text and stop state."""

    seq: Sequence
    detok: IncrementalDetokenizer
    text: str = ""                    # generated text so far (up to a stop string)
    num_sent_chars: int = 0
    cold_start: bool = False


class Engine:
    def __init__(self, config: EngineConfig | None = None):
        import torch

        from worker.runner import ModelRunner

        self.config = config = config or EngineConfig()
        torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.chunk_size))
        self.runner = ModelRunner(config.block_size, config.kv_cache_bytes, config.residency,
                                  config.load_budget_bytes, config.host_store_root,
                                  max_num_seqs=config.max_num_seqs, device=config.device,
                                  device_cache_bytes=config.device_cache_bytes)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []   # aborts, reported by the next step
        self._stats = EngineStats(0, 0, 0.0, {})

    # -- models -------------------------------------------------------------------------
    def add_model(self, model_id: str, model_dir: str | Path, preload: bool = False) -> None:
        """Register a checkpoint folder; CheckpointError if it is unusable.

        Host mode makes it resident in the host store now and maps it on its first request
        (or now, with preload=True); load mode copies it on its first request.
        """
        config = load_config(model_dir)
        tokenizer = Tokenizer(model_dir)
        num_blocks = self.runner.register(model_id, Path(model_dir), config)
        self.scheduler.add_model(model_id, num_blocks, self.config.block_size)
        self._tokenizers[model_id] = tokenizer
        if preload:
            self.prewarm(model_id)

    def warmup(self) -> None:
        """One-time work a worker does at start, so its first request does not pay it."""
        self.runner.warmup()

    def prewarm(self, model_id) -> bool:
        """Map (host) or load (load mode) the model now; True if it was not yet."""
        self._check_model(model_id)
        return self.runner.ensure_loaded(model_id, self.scheduler.is_model_busy)

    def evict(self, model_id) -> bool:
        """Drop the model's weights and KV cache; False (kept) while a request of it runs."""
        self._check_model(model_id)
        if self.scheduler.is_model_busy(model_id):
            return False
        self.runner.unload(model_id)
        return True

    def has_model(self, model_id) -> bool:
        return model_id in self._tokenizers

    def model_ids(self) -> list[str]:
        return list(self._tokenizers)

    def tokenizer(self, model_id) -> Tokenizer:
        self._check_model(model_id)
        return self._tokenizers[model_id]

    def context_window(self, model_id) -> int:
        self._check_model(model_id)
        return self.runner.slots[model_id].config.max_position_embeddings

    def _check_model(self, model_id) -> None:
        if model_id not in self._tokenizers:
            raise ModelNotFound(f"model {model_id!r} is not served here (serving: {', '.join(self._tokenizers) or 'none'})",
                                param="model")

    # -- requests -----------------------------------------------------------------------
    def add_request(self, request_id, model_id, prompt: str | None = None,
                    prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None,
                    messages: list[dict] | None = None,
                    arrival_s: float | None = None,
                    ttft_slo_s: float | None = None, tpot_slo_s: float | None = None) -> None:
        """Queue a request; raises InvalidRequest / ContextLengthExceeded / ModelNotFound at once."""
        params = params or SamplingParams()
        self._check_model(model_id)
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        check_params(params)
        token_ids = self._prompt_ids(model_id, prompt, prompt_token_ids, messages)
        self._check_length(model_id, len(token_ids), params.max_tokens)
        seq = Sequence(request_id, model_id, token_ids, len(token_ids), params,
                       time.time() if arrival_s is None else arrival_s)
        seq.ttft_slo_s = ttft_slo_s or seq.ttft_slo_s
        seq.tpot_slo_s = tpot_slo_s or seq.tpot_slo_s
        detok = IncrementalDetokenizer(self._tokenizers[model_id], token_ids)
        self._requests[request_id] = _Request(seq, detok)
        self.scheduler.add(seq)

    def _prompt_ids(self, model_id, prompt, prompt_token_ids, messages) -> list[int]:
        tokenizer = self._tokenizers[model_id]
        if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
            raise InvalidRequest("give exactly one of prompt, prompt_token_ids, messages")
        if messages is not None:
            if not isinstance(messages, list) or not messages:
                raise InvalidRequest("messages must be a non-empty list", param="messages")
            ids = tokenizer.encode_chat(messages)
        elif prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidRequest("prompt is empty", param="prompt")
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
        vocab_size = self.runner.slots[model_id].config.vocab_size
        if not ids:
            raise InvalidRequest("prompt is empty (no tokens)", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
            raise InvalidRequest(f"prompt token ids must be ints in [0, {vocab_size})", param="prompt")
        return ids

    def _check_length(self, model_id: str, num_prompt: int, max_tokens: int) -> None:
        window = self.context_window(model_id)
        if num_prompt >= window:
            raise ContextLengthExceeded(
                f"prompt has {num_prompt} tokens; {model_id}'s context window is {window} tokens", param="prompt")
        if num_prompt + max_tokens > window:
            raise ContextLengthExceeded(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {num_prompt + max_tokens} "
                f"tokens exceeds {model_id}'s context window of {window} tokens", param="max_tokens")
        capacity = self.runner.slots[model_id].num_blocks * self.config.block_size
        if num_prompt + max_tokens > capacity:
            raise ContextLengthExceeded(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds this worker's KV cache "
                f"of {capacity} tokens for {model_id}", param="max_tokens")

    def abort(self, request_id) -> None:
        """Stop a request; its final output (finish_reason "abort") comes from the next step."""
        req = self._requests.get(request_id)
        if req is None:
            return
        self.scheduler.finish(req.seq, "abort")
        self._pending.append(self._final(req, "abort", error_code=ErrorCode.ABORTED))

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    # -- one step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run, postprocess; returns this step's outputs (one per changed request)."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if batch is None:
            return outputs
        try:
            if self.runner.ensure_loaded(batch.model_id, self.scheduler.is_model_busy):
                self._mark_cold_start(batch.seqs)
            token_ids = self.runner.run(batch)
        except Exception as exc:  # one model's failure must not stop the others
            logger.exception("step of model %s failed", batch.model_id)
            return outputs + self._fail_model(batch.model_id, exc)
        self._count(batch)
        for seq in self.scheduler.postprocess(batch, token_ids):
            outputs.append(self._postprocess(self._requests[seq.request_id]))
        return outputs

    def _mark_cold_start(self, seqs: list[Sequence]) -> None:
        first = next((s for s in seqs if s.first_token_s is None), seqs[0])
        self._requests[first.request_id].cold_start = True

    def _count(self, batch) -> None:
        self._stats.num_steps += 1
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.is_prefill or num_new > 1:
                self._stats.num_prefill_tokens += num_new
            else:
                self._stats.num_decode_tokens += num_new

    def _postprocess(self, req: _Request) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        token = seq.token_ids[-1]
        reason = None
        if token in params.stop_token_ids:
            reason = "stop"
        elif not params.ignore_eos and token in self._tokenizers[seq.model_id].eos_token_ids:
            reason = "stop"
        else:
            req.text += req.detok.add(token)
        if reason is None and (seq.num_generated >= params.max_tokens
                               or seq.num_tokens >= self.context_window(seq.model_id)):
            reason = "length"
        new_text, hit_stop = self._release_text(req, final=reason is not None)
        if hit_stop:
            reason = "stop"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget(seq.request_id)
        return RequestOutput(seq.request_id, seq.model_id, [token], new_text, reason is not None, reason,
                             seq.num_prompt_tokens, seq.num_generated, cold_start=self._take_cold(req))

    def _release_text(self, req: _Request, final: bool) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop string ended the request.

        Text that could be the start of a stop string is held back until it is not.
        """
        if final:
            req.text += req.detok.flush()
        stops = req.seq.params.stop
        hit = min((i for s in stops if (i := req.text.find(s, req.num_sent_chars)) >= 0), default=-1)
        if hit >= 0:
            req.text = req.text[:hit]
        end = len(req.text) if final or hit >= 0 else len(req.text) - _held_back(req.text, req.num_sent_chars, stops)
        new_text = req.text[req.num_sent_chars : end]
        req.num_sent_chars = end
        return new_text, hit >= 0

    def _take_cold(self, req: _Request) -> bool:
        cold, req.cold_start = req.cold_start, False
        return cold

    def _fail_model(self, model_id: str, exc: Exception) -> list[RequestOutput]:
        message = f"{type(exc).__name__}: {exc}"
        failed = [s for s in self.scheduler.running if s.model_id == model_id]
        outputs = []
        for seq in failed:
            self.scheduler.finish(seq, "error")
            outputs.append(self._final(self._requests[seq.request_id], "error", message, ErrorCode.INTERNAL))
        return outputs

    def _final(self, req: _Request, reason: str, error: str | None = None, error_code: int = 0) -> RequestOutput:
        seq = req.seq
        self._forget(seq.request_id)
        return RequestOutput(seq.request_id, seq.model_id, [], "", True, reason, seq.num_prompt_tokens,
                             seq.num_generated, error, int(error_code), self._take_cold(req))

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.runner.sampler.release(request_id)

    # -- control and stats --------------------------------------------------------------
    def set_control(self, **knobs) -> None:
        """Runtime knobs: chunk_size, max_num_seqs, max_num_batched_tokens, decode_threshold, rho."""
        import kernels

        for name, value in knobs.items():
            if value is None:
                continue
            if name in ("chunk_size", "max_num_seqs", "max_num_batched_tokens"):
                if int(value) < 1:
                    raise InvalidRequest(f"{name} must be >= 1, got {value}")
                setattr(self.scheduler.config, name, int(value))
            elif name == "decode_threshold":
                kernels.set_decode_threshold(int(value))
            elif name == "rho":
                if not 0.0 <= float(value) <= 1.0:
                    raise InvalidRequest(f"rho must be in [0, 1], got {value}")
                self.runner.set_rho(float(value))
            else:
                logger.debug("ignoring unknown control knob %s=%r", name, value)

    def stats(self) -> EngineStats:
        per_model = {}
        for model_id in self._tokenizers:
            num_running, num_waiting, kv_used = self.scheduler.model_stats(model_id)
            per_model[model_id] = ModelStats(num_running, num_waiting, kv_used,
                                             self.runner.slots[model_id].is_loaded)
        s = self._stats
        return EngineStats(sum(m.num_running for m in per_model.values()),
                           sum(m.num_waiting for m in per_model.values()),
                           max((m.kv_used_frac for m in per_model.values()), default=0.0),
                           per_model, s.num_steps, s.num_prefill_tokens, s.num_decode_tokens,
                           self.scheduler.num_preemptions, self.runner.loaded_bytes(),
                           self.runner.cached_fractions())

    def generate(self, model_id, prompt, params: SamplingParams | None = None, **kwargs) -> RequestOutput:
        """Run one request to the end (other requests' outputs in these steps are dropped)."""
        request_id = f"gen-{uuid.uuid4().hex[:12]}"
        key = "prompt_token_ids" if isinstance(prompt, list) else "prompt"
        self.add_request(request_id, model_id, params=params, **{key: prompt}, **kwargs)
        result = RequestOutput(request_id, model_id, [], "", False, None, 0, 0)
        while not result.finished:
            for out in self.step():
                if out.request_id == request_id:
                    _merge(result, out)
        return result


def _merge(into: RequestOutput, out: RequestOutput) -> None:
    into.new_token_ids += out.new_token_ids
    into.new_text += out.new_text
    into.cold_start |= out.cold_start
    for name in ("finished", "finish_reason", "num_prompt_tokens", "num_generated_tokens", "error", "error_code"):
        setattr(into, name, getattr(out, name))


def _held_back(text: str, start: int, stops: list[str]) -> int:
    """Length of the longest tail of text[start:] that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
