"""The inference engine of one worker slice: several models, continuous batching.

One `step()` is three calls, like nano-vllm: `scheduler.schedule()` (pure: which model,
which sequences, how many tokens each), `runner.run(batch)` (tensors: forward + sample),
`scheduler.postprocess(...)` then the engine's own stop checks and detokenization.

Failures: bad input raises `InvalidRequest` / `ContextLengthExceeded` / `ModelNotFound`
from `tokenize_request` / `add_request` and nothing is queued. An exception in a step's
forward pass fails that model's running requests; one request whose sample or
postprocessing fails ends alone (finish_reason "error", with the message) while the
batch's others go on; the engine keeps serving either way.

Threads: only one thread (the engine loop's) may call `add_request`, `step` and the
rest; `tokenize_request` is safe from any thread, so a caller tokenizes a long prompt
elsewhere (the GIL released) and hands `add_request` the ids.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import ContextLengthExceeded, ErrorCode, InvalidRequest, ModelNotFound
from services.knobs import DEFAULT_KNOBS
from worker.checkpoint import load_config
from worker.pipeline import StageError, StageSpec
from worker.sampling import SampleContext, check_params, is_plain
from worker.scheduler import Scheduler, SchedulerConfig
from worker.sequence import Sequence, check_times
from worker.tokenizer import TextStream, Tokenizer, prompt_ids

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
    presence_penalty: float = 0.0  # vLLM semantics: see worker.sampling
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    logprobs: int | None = None    # None: none; k: the sampled token's logprob and the top k
    json_schema: str | None = None # the output must follow this JSON schema (worker.constrained)
    num_resumed_tokens: int = 0    # the prompt ends with this many tokens an earlier assignment
                                   # generated (re-dispatch): penalties and min_tokens count them as output


@dataclass
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = DEFAULT_KNOBS.max_num_seqs  # batch cap (runtime knobs: services/knobs.py)
    max_num_batched_tokens: int = DEFAULT_KNOBS.max_num_batched_tokens
    chunk_size: int = DEFAULT_KNOBS.chunk_size
    kv_cache_bytes: int = 256 * MiB   # per model
    residency: str = "host"           # "host" | "load"
    load_budget_bytes: int | None = None   # "load": private weight memory, LRU
    host_store_root: str | None = None
    num_threads: int | None = None    # torch threads; None = every core this process may use
    device: str = "cpu"               # "cpu" | "cuda": the device engine (worker.device_runner) on the slice's GPU
    device_cache_bytes: int = 0       # "cuda": slice memory for cached weight tiles (knob rho)
    host_kv_bytes: int = 512 * MiB    # per model: the host KV tier rotation uses (0: recompute only)
    quantize: str | None = None       # "int8" | "q4" weights (CPU); None = C2C_QUANTIZE, "" = none


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
    logprobs: list = field(default_factory=list)  # sampling.TopLogprobs per new token, when asked


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
    num_queued_prefill_tokens: int = 0  # prompt tokens admitted or waiting, not yet prefilled
    max_num_seqs: int = 0  # the batch cap in force (the controller moves it)
    kv_device_blocks_used: int = 0  # KV blocks in use, all models: in the KV cache
    kv_host_blocks_used: int = 0    # and in the host tier (rotated out)
    num_swaps_out: int = 0          # rotation totals since start (worker/rotation.py)
    num_swaps_in: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    num_rotation_stalls: int = 0    # rotated sequences back later than their TPOT slack allowed
    rotation_stall_s: float = 0.0


@dataclass
class _Request:
    """What the engine keeps per request beside its Sequence: text and stop state."""

    seq: Sequence
    text: TextStream
    cold_start: bool = False


class Engine:
    def __init__(self, config: EngineConfig | None = None):
        import torch

        from worker.runner import ModelRunner

        self.config = config = config or EngineConfig()
        torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.chunk_size))
        if config.device == "cuda":  # everything but the streamed weights on the slice
            from worker.device_runner import DeviceModelRunner

            self.runner = DeviceModelRunner(config.block_size, config.kv_cache_bytes, config.residency,
                                            config.load_budget_bytes, config.host_store_root,
                                            config.max_num_seqs, config.device_cache_bytes)
        else:
            self.runner = ModelRunner(config.block_size, config.kv_cache_bytes, config.residency,
                                      config.load_budget_bytes, config.host_store_root,
                                      max_num_seqs=config.max_num_seqs, device=config.device,
                                      quantize=config.quantize)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []   # aborts, reported by the next step
        self._stats = EngineStats(0, 0, 0.0, {})
        self._weight_bytes: dict[str, int] = {}  # model -> checkpoint bytes (a step reads them once)
        self.last_step_model: str | None = None  # the model the last step ran (state telemetry)
        self.kv_tier = None
        if config.host_kv_bytes > 0:
            from worker.kv_tier import KVTier
            from worker.rotation import Rotator

            self.kv_tier = KVTier(config.host_kv_bytes, config.block_size, lambda m: self.runner.slots[m].kv,
                                  self.runner.kv_dtype)
            self.scheduler.rotator = Rotator(self.kv_tier)
        self._switches: dict = {}        # model -> reconfig.PipelineSwitch under way
        self._stage_client = None        # stage_client.StageClient, for remote pipeline stages

    # -- models -------------------------------------------------------------------------
    def add_model(self, model_id: str, model_dir: str | Path, preload: bool = False) -> None:
        """Register a checkpoint folder; CheckpointError if it is unusable.

        Host mode makes it resident in the host store now and maps it on its first request
        (or now, with preload=True); load mode copies it on its first request. A `.gguf`
        file stands for the checkpoint folder it converts into (`worker.gguf_checkpoint`).
        """
        from worker.gguf_checkpoint import checkpoint_dir

        model_dir = checkpoint_dir(model_dir)
        config = load_config(model_dir)
        tokenizer = Tokenizer(model_dir)
        num_blocks = self.runner.register(model_id, Path(model_dir), config)
        self.scheduler.add_model(model_id, num_blocks, self.config.block_size)
        if self.kv_tier is not None:
            self.scheduler.rotator.add_model(model_id, self.kv_tier.add_model(model_id, config), self.config.block_size)
        self._tokenizers[model_id] = tokenizer
        self._weight_bytes[model_id] = _checkpoint_bytes(Path(model_dir))
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
        """Drop the model's weights and KV cache; False (kept) while a request of it runs or it is
        being reconfigured."""
        self._check_model(model_id)
        if self.scheduler.is_model_busy(model_id) or model_id in self._switches:
            return False
        self.runner.unload(model_id)
        return True

    def step_read_bytes(self, model_id: str | None) -> int:
        """Weight bytes one step of the model reads (its checkpoint's; for a mixture of
        experts an upper bound: a small batch touches only some experts)."""
        return self._weight_bytes.get(model_id, 0) if model_id is not None else 0

    def has_model(self, model_id) -> bool:
        return isinstance(model_id, str) and model_id in self._tokenizers

    def model_ids(self) -> list[str]:
        return list(self._tokenizers)

    def tokenizer(self, model_id) -> Tokenizer:
        self._check_model(model_id)
        return self._tokenizers[model_id]

    def context_window(self, model_id) -> int:
        self._check_model(model_id)
        return self.runner.slots[model_id].config.max_position_embeddings

    def _check_model(self, model_id) -> None:
        if not isinstance(model_id, str) or model_id not in self._tokenizers:
            raise ModelNotFound(f"model {model_id!r} is not served here (serving: {', '.join(self._tokenizers) or 'none'})",
                                param="model")

    # -- requests -----------------------------------------------------------------------
    def add_request(self, request_id, model_id, prompt: str | None = None,
                    prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None,
                    messages: list[dict] | None = None,
                    arrival_s: float | None = None,
                    ttft_slo_s: float | None = None, tpot_slo_s: float | None = None,
                    tenant: str = "") -> None:
        """Queue a request; raises InvalidRequest / ContextLengthExceeded / ModelNotFound at once.
        `tenant`: whose request it is (the scheduler shares batch slots fairly between tenants).

        Cheap with prompt_token_ids (from `tokenize_request`, run in another thread)."""
        params = params or SamplingParams()
        self._check_model(model_id)
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest(f"request id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
        check_params(params)
        check_times(arrival_s=arrival_s, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)
        token_ids = self.tokenize_request(model_id, prompt, prompt_token_ids, messages)
        self._check_length(model_id, len(token_ids), params.max_tokens)
        seq = Sequence(request_id, model_id, token_ids, len(token_ids), params,
                       time.time() if arrival_s is None else arrival_s)
        seq.ttft_slo_s = ttft_slo_s or seq.ttft_slo_s
        seq.tpot_slo_s = tpot_slo_s or seq.tpot_slo_s
        seq.tenant = tenant if isinstance(tenant, str) else ""
        # vLLM checks stop strings only once min_tokens were generated (_postprocess adds them)
        text = TextStream(self._tokenizers[model_id], token_ids, [] if params.min_tokens else params.stop)
        context = self._sample_context(seq)
        self._requests[request_id] = _Request(seq, text)
        self.runner.sampler.track(request_id, context)
        self.scheduler.add(seq)

    def _sample_context(self, seq: Sequence) -> SampleContext:
        """What the sampler's processors read; InvalidRequest for a logit_bias id outside the
        vocabulary or a schema the grammar library cannot enforce."""
        params, tokenizer = seq.params, self._tokenizers[seq.model_id]
        vocab_size = self.runner.slots[seq.model_id].config.vocab_size
        bad_ids = [t for t in params.logit_bias if t >= vocab_size]
        if bad_ids:
            raise InvalidRequest(f"logit_bias: token id {bad_ids[0]} is outside the vocabulary of "
                                 f"{seq.model_id} (size {vocab_size})", param="logit_bias")
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else tuple(tokenizer.eos_token_ids))
        matcher = None
        if params.json_schema:
            from worker.constrained import GrammarMatcher

            matcher = GrammarMatcher(tokenizer, params.json_schema)
        num_prompt = max(0, seq.num_prompt_tokens - params.num_resumed_tokens)
        return SampleContext(seq.token_ids, num_prompt, stop_ids, matcher, is_plain(params))

    def tokenize_request(self, model_id, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                         messages: list[dict] | None = None) -> list[int]:
        """A request's prompt ids, from exactly one of prompt, prompt_token_ids, messages.

        Thread-safe (reads what add_model wrote), and the GIL is released while text is
        encoded. Bounded: a text certainly past the context window is rejected after a
        prefix of it is tokenized. Raises ModelNotFound, InvalidRequest (an id outside the
        vocabulary, bad messages), ContextLengthExceeded (the prompt fills the window).
        """
        self._check_model(model_id)
        window = self.context_window(model_id)
        vocab_size = self.runner.slots[model_id].config.vocab_size
        ids = prompt_ids(self._tokenizers[model_id], window - 1, vocab_size, prompt, prompt_token_ids, messages)
        if ids is None or len(ids) >= window:
            num_tokens = len(ids) if ids is not None else (
                len(prompt_token_ids) if prompt_token_ids is not None else f"more than {window - 1}")
            raise ContextLengthExceeded(f"prompt has {num_tokens} tokens; {model_id}'s context window is "
                                        f"{window} tokens", param="messages" if messages is not None else "prompt")
        return ids

    def _check_length(self, model_id: str, num_prompt: int, max_tokens: int) -> None:
        window = self.context_window(model_id)
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
        if not isinstance(request_id, str):
            raise InvalidRequest(f"request id must be a string, got {request_id!r}")
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
        self._advance_switches()
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.rotator is not None:  # all that could run is in flight between KV tiers
                self.scheduler.rotator.wait_any(timeout_s=0.05)
            return outputs
        start_s = self.scheduler.clock()
        try:
            if self.runner.ensure_loaded(batch.model_id, self.scheduler.is_model_busy):
                self._mark_cold_start(batch.seqs)
            sampled = self.runner.run(batch)  # a token id, or the exception of a failed sample
        except StageError as exc:  # a pipeline stage failed: serve whole here, recompute the KV
            logger.error("pipeline of model %s failed (%s): serving it whole, recomputing", batch.model_id, exc)
            self._fall_back_to_one_stage(batch.model_id)
            return outputs
        except Exception as exc:  # one model's failure must not stop the others
            logger.exception("step of model %s failed", batch.model_id)
            return outputs + self._fail_model(batch.model_id, exc)
        self.scheduler.observe_step(self.scheduler.clock() - start_s)
        self._count(batch)
        outputs += self._fail_unsampled(batch, sampled)
        for seq in self.scheduler.postprocess(batch, sampled):
            outputs.append(self._postprocess_or_fail(self._requests[seq.request_id]))
        return outputs

    def _fail_unsampled(self, batch, sampled: list) -> list[RequestOutput]:
        """Requests whose sample failed end with an error; the batch's others go on."""
        sampled_seqs = [s for s, flag in zip(batch.seqs, batch.sample_flags, strict=True) if flag]
        outputs = []
        for seq, token_id in zip(sampled_seqs, sampled, strict=True):
            if isinstance(token_id, Exception):
                logger.error("[req=%s] sampling failed: %s", seq.request_id, token_id)
                outputs.append(self._fail_request(self._requests[seq.request_id], token_id))
        return outputs

    def _postprocess_or_fail(self, req: _Request) -> RequestOutput:
        try:
            return self._postprocess(req)
        except Exception as exc:  # one request's detokenization or stop check must not fail the step
            logger.exception("[req=%s] postprocessing failed", req.seq.request_id)
            return self._fail_request(req, exc)

    def _fail_request(self, req: _Request, exc: Exception) -> RequestOutput:
        self.scheduler.finish(req.seq, "error")
        return self._final(req, "error", f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL)

    def _mark_cold_start(self, seqs: list[Sequence]) -> None:
        first = next((s for s in seqs if s.first_token_s is None), seqs[0])
        self._requests[first.request_id].cold_start = True

    def _count(self, batch) -> None:
        self._stats.num_steps += 1
        self.last_step_model = batch.model_id
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.is_prefill or num_new > 1:
                self._stats.num_prefill_tokens += num_new
            else:
                self._stats.num_decode_tokens += num_new

    def _postprocess(self, req: _Request) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        token = seq.token_ids[-1]
        logprobs = self.runner.sampler.logprobs.pop(seq.request_id, None)
        reason = None
        if token in params.stop_token_ids:
            reason = "stop"
        elif not params.ignore_eos and token in self._tokenizers[seq.model_id].eos_token_ids:
            reason = "stop"
        else:
            req.text.add(token)
        if reason is None and self._is_grammar_finished(seq.request_id):
            reason = "stop"
        if reason is None and (seq.num_generated >= params.max_tokens
                               or seq.num_tokens >= self.context_window(seq.model_id)):
            reason = "length"
        if params.stop and not req.text.stops and seq.num_generated + params.num_resumed_tokens >= params.min_tokens:
            req.text.stops = params.stop
        new_text, hit_stop = req.text.release(final=reason is not None)
        if hit_stop:
            reason = "stop"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget(seq.request_id)
        return RequestOutput(seq.request_id, seq.model_id, [token], new_text, reason is not None, reason,
                             seq.num_prompt_tokens, seq.num_generated, cold_start=self._take_cold(req),
                             logprobs=[logprobs] if logprobs is not None else [])

    def _is_grammar_finished(self, request_id: str) -> bool:
        context = self.runner.sampler.context(request_id)
        return context is not None and context.matcher is not None and context.matcher.is_finished

    def _take_cold(self, req: _Request) -> bool:
        cold, req.cold_start = req.cold_start, False
        return cold

    def _fail_model(self, model_id: str, exc: Exception) -> list[RequestOutput]:
        failed = [s for s in self.scheduler.running if s.model_id == model_id]
        return [self._fail_request(self._requests[seq.request_id], exc) for seq in failed]

    def _final(self, req: _Request, reason: str, error: str | None = None, error_code: int = 0) -> RequestOutput:
        seq = req.seq
        self._forget(seq.request_id)
        return RequestOutput(seq.request_id, seq.model_id, [], "", True, reason, seq.num_prompt_tokens,
                             seq.num_generated, error, int(error_code), self._take_cold(req))

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.runner.sampler.release(request_id)

    # -- pipelines (worker/pipeline.py, worker/reconfig.py) ----------------------------
    def reconfigure(self, model_id, specs: list[StageSpec], nats_url: str | None = None):
        """Serve the model as a pipeline of these stages from a later step on, switched
        online (worker/reconfig.py); returns the PipelineSwitch. nats_url: remote stages'."""
        from worker.reconfig import PipelineSwitch, build_pipeline

        self.prewarm(model_id)
        if model_id in self._switches:
            raise InvalidRequest(f"model {model_id!r} is already being reconfigured")
        slot = self.runner.slots[model_id]
        if nats_url and self._stage_client is None:
            from worker.stage_client import StageClient

            self._stage_client = StageClient(nats_url)
        if slot.pipeline is None:  # the model whole, as a one-stage pipeline: same maths
            slot.pipeline = build_pipeline([StageSpec(0, slot.config.num_layers)], slot, self.runner, None)
        held = lambda: sorted({b for s in self.scheduler.running if s.model_id == model_id  # noqa: E731
                               for b in s.block_table})
        switch = PipelineSwitch(slot.pipeline, lambda: build_pipeline(specs, slot, self.runner, self._stage_client),
                                held)
        self._switches[model_id] = switch
        return switch

    def is_reconfiguring(self, model_id) -> bool:
        return model_id in self._switches

    def _advance_switches(self) -> None:
        for model_id, switch in list(self._switches.items()):
            pipeline = switch.advance()
            if pipeline is not None:
                self.runner.slots[model_id].pipeline = pipeline
                del self._switches[model_id]

    def close_pipelines(self) -> None:
        """Retire every pipeline's stages (each model served whole again) and the stage client."""
        for slot in self.runner.slots.values():
            if slot.pipeline is not None:
                slot.pipeline.close()
                slot.pipeline = None
        if self._stage_client is not None:
            self._stage_client.close()
            self._stage_client = None

    def _fall_back_to_one_stage(self, model_id: str) -> None:
        slot = self.runner.slots[model_id]
        self._switches.pop(model_id, None)
        if slot.pipeline is not None:
            slot.pipeline.close()
            slot.pipeline = None
        self.scheduler.recompute(model_id)

    # -- control and stats --------------------------------------------------------------
    def set_control(self, **knobs) -> None:
        """Runtime knobs: chunk_size, max_num_seqs, max_num_batched_tokens, decode_threshold, rho."""
        import c2c_kernels as kernels

        for name, value in knobs.items():
            if value is None:
                continue
            if name in ("chunk_size", "max_num_seqs", "max_num_batched_tokens"):
                setattr(self.scheduler.config, name, _knob(name, value, int, 1, math.inf))
            elif name == "decode_threshold":
                kernels.set_decode_threshold(_knob(name, value, int, 0, math.inf))
            elif name == "rho":
                self.runner.set_rho(_knob(name, value, float, 0.0, 1.0))
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
                           self.runner.cached_fractions(), self.scheduler.num_queued_prefill_tokens(),
                           int(self.scheduler.config.max_num_seqs), *self._kv_tier_stats())

    def _kv_tier_stats(self) -> tuple:
        """EngineStats' KV tier fields, in order."""
        sched, rotator, tier = self.scheduler, self.scheduler.rotator, self.kv_tier
        num_device = sum(bm.num_blocks - bm.num_free_blocks for bm in sched.block_managers.values())
        if tier is None:
            return (num_device,)
        return (num_device, rotator.num_host_blocks_used(), rotator.num_swaps_out, rotator.num_swaps_in,
                tier.num_bytes_out, tier.num_bytes_in, rotator.num_stalls, rotator.stall_s)

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
    into.logprobs += out.logprobs
    for name in ("finished", "finish_reason", "num_prompt_tokens", "num_generated_tokens", "error", "error_code"):
        setattr(into, name, getattr(out, name))


def _checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of a checkpoint's weight files (a folder of safetensors, or one file)."""
    if model_dir.is_file():
        return model_dir.stat().st_size
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _knob(name: str, value, kind: type, low: float, high: float):
    """A control knob as `kind` in [low, high]; InvalidRequest naming it otherwise."""
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidRequest(f"{name} must be in [{low}, {high}], got {value!r}")
    return number
