"""Every message that travels on NATS, as `msgspec.Struct`s encoded with msgpack.

Hot messages (one per request or per token: `SubmitRequest`, `TokenChunk`,
`AbortRequest`, `WorkerState`) are `array_like=True, omit_defaults=True, gc=False`:
fields go on the wire by position, so a schema change only APPENDS fields with
defaults, never reorders or removes. Enums travel as ints.

Decoding happens at the edge with one typed decoder per subject (`decoder(T)`);
a payload that does not match raises `msgspec.ValidationError`/`DecodeError`, which
services log and drop (or answer with an error chunk), never crash on.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, TypeVar

import msgspec

from services.knobs import DEFAULT_KNOBS

T = TypeVar("T")


class RequestKind(IntEnum):
    COMPLETION = 0  # /v1/completions: `prompt`
    CHAT = 1  # /v1/chat/completions: `messages`, rendered with the model's chat template


class FinishReason(IntEnum):
    NONE = 0  # not finished yet
    STOP = 1  # EOS or a stop string/token
    LENGTH = 2  # max_tokens reached
    ABORT = 3  # aborted (client went away)
    ERROR = 4  # failed: see TokenChunk.error_code / error


FINISH_REASON_TEXT = {
    FinishReason.NONE: None,
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
    FinishReason.ERROR: "error",
}
FINISH_REASON_FROM_TEXT = {v: k for k, v in FINISH_REASON_TEXT.items() if v is not None}


class ResidencyAction(IntEnum):
    PREWARM = 1  # make the model resident in the host store and map it on the slice
    EVICT = 2  # unmap it from the slice, drop its cached tiles


_HOT = dict(array_like=True, omit_defaults=True, gc=False)


class SubmitRequest(msgspec.Struct, **_HOT):
    """gateway -> placer (`c2c.sched.submit`) -> worker (`c2c.worker.<id>.submit`).

    The NATS reply subject is the gateway's inbox for this request; `TokenChunk`s go there.
    """

    request_id: str
    model_id: str
    kind: RequestKind = RequestKind.COMPLETION
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    arrival_s: float = 0.0  # wall clock (time.time()) when the gateway received it
    slo_class: str = "standard"
    worker_id: str = ""  # set by the placer
    resumed_token_ids: list[int] = []  # re-dispatch: tokens already streamed to the client
    num_prompt_chars: int = 0  # for the placer's token estimate (chars / 4)
    resumed_num_chars: int = 0  # re-dispatch: characters of text the client already got
    epoch: int = 0  # the gateway's assignment counter for this request: 1 first, +1 per re-dispatch
    tenant: str = ""  # the caller's tenant ("" without a tenants file): fair sharing and usage
    # -- sampling extras, vLLM semantics (gateway.openai_api checks their ranges) --
    presence_penalty: float = 0.0  # output tokens: logit -= p if the token was generated
    frequency_penalty: float = 0.0  # output tokens: logit -= p * times generated
    repetition_penalty: float = 1.0  # prompt + output tokens: logit / p if > 0 else * p
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    logprobs: int = -1  # -1: none; k >= 0: the sampled token's logprob and the top k (raw logits)
    echo: bool = False  # completions: the first chunk carries the prompt's text (prompt_text)
    json_schema: str = ""  # response_format: a JSON schema (text) the output must follow; "" none
    ttft_slo_ms: float = 0.0  # resolved by the gateway (services/slo.py); 0: the worker's default
    tpot_slo_ms: float = 0.0


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    """One generated token's log-probability and its top alternatives (log-softmax of the
    model's raw logits, as vLLM's default `raw_logprobs`); tokens as their decoded text."""

    token_id: int
    token: str
    logprob: float
    top_token_ids: list[int] = []
    top_tokens: list[str] = []
    top_logprobs: list[float] = []


class TokenChunk(msgspec.Struct, **_HOT):
    """worker (or placer, for errors) -> the gateway inbox: a piece of one request's output.

    The last chunk has `finish_reason != NONE` and carries the token counts; a failed
    request ends with `finish_reason = ERROR` and a non-zero `error_code`.
    """

    request_id: str
    worker_id: str = ""
    token_ids: list[int] = []
    text: str = ""
    finish_reason: FinishReason = FinishReason.NONE
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    error_code: int = 0  # services.errors.ErrorCode
    error: str = ""
    cold_start: bool = False
    queue_s: float = 0.0  # first chunk: time the request waited on the worker before running
    redispatch: bool = False  # from the placer: the worker died; resubmit with the tokens so far
    num_resumed_tokens: int = 0  # first chunk after a re-dispatch: streamed tokens kept as prompt
    epoch: int = 0  # the assignment this chunk belongs to; the gateway drops other epochs (fencing)
    seq: int = 0  # this chunk's index within its assignment: a gap means chunks were lost
    error_param: str = ""  # the request parameter an error is about (OpenAI's error.param)
    accepted: bool = False  # a worker took this assignment (no tokens, no seq): it was not lost
    logprobs: list[TokenLogprob] = []  # one per token of token_ids when the request asked for them
    prompt_text: str = ""  # first chunk, echo: the prompt's text
    migrated_from: str = ""  # the first chunk after a live migration: the worker it left (fencing)

    @property
    def is_final(self) -> bool:
        return self.finish_reason != FinishReason.NONE


class AbortRequest(msgspec.Struct, **_HOT):
    """gateway/placer -> worker (`c2c.worker.<id>.abort`): stop generating for this request."""

    request_id: str
    reason: str = "client disconnected"
    epoch: int = 0  # abort only this assignment and older ones (0: whatever runs)


class WorkerState(msgspec.Struct, **_HOT):
    """The one record of a worker's state: produced by its engine loop with live values,
    published as telemetry (worker -> placer, controller on `c2c.telemetry.<id>`, about
    every 100 ms), and the input of the placer's and the controller's policies, live and
    in the simulator alike (`tests/test_state_contract.py` fails when a field a policy
    reads is never produced by a live worker).

    On a CPU slice the "link" is the memory bus to the shared host store: `link_gbps` is
    the weight bytes its steps read per second of step time, `link_capacity_gbps` the
    read bandwidth measured on the node, `link_util` = achieved / capacity while busy.
    """

    worker_id: str
    node: str = ""
    gpu: str = ""  # link domain
    backend: str = "cpu"  # "cuda" | "cpu"
    t_s: float = 0.0
    models: list[str] = []  # models this slice serves now (mapped)
    cached_fraction: dict[str, float] = {}
    num_running: int = 0
    num_waiting: int = 0
    max_num_seqs: int = DEFAULT_KNOBS.max_num_seqs
    kv_free_frac: float = 1.0
    link_util: float = 0.0
    link_gbps: float = 0.0
    ttft_p50_ms: float | None = None
    tpot_p50_ms: float | None = None
    pinned_models: list[str] = []
    residency: str = "host"
    num_finished: int = 0  # requests finished since the worker started
    num_aborted: int = 0
    request_ids: list[str] = []  # requests in flight (for re-dispatch)
    is_stopping: bool = False  # last message of a worker shutting down: route nothing more here
    request_epochs: list[int] = []  # the epoch of each of request_ids (fencing a worker that came back)
    stalled_s: float = 0.0  # how long the engine has had work without finishing a step
    queued_prefill_tokens: int = 0  # prompt tokens admitted or waiting, not yet prefilled
    prefill_tokens_per_s: float = 0.0  # measured prefill throughput of this slice (0: not yet)
    incarnation: str = ""  # random per worker process: a new one under the same id means a restart
    link_demand_gbps: float = 0.0  # bytes its steps read per wall second (the placer sums a link domain's)
    link_capacity_gbps: float = 0.0  # the read bandwidth available to it (CPU: measured on the node; 0 unknown)
    cycle_ms: float = 0.0  # one step of every model with work, in turn: a token's wait (0: idle)
    step_ms: float = 0.0  # mean engine step time over the last window (0: no step)
    oldest_wait_ms: float | None = None  # age of the oldest request without its first token
    ttft_slo_ms: float = 0.0  # the tightest TTFT target among its requests (services/slo.py; 0: none)
    tpot_slo_ms: float = 0.0  # the tightest TPOT target among its requests
    active_models: list[str] = []  # models with requests here now: each adds its step to every token's wait
    kv_device_blocks_used: int = 0  # KV blocks in use in the KV cache (all models)
    kv_host_blocks_used: int = 0  # and in the host tier: sequences rotated out (worker/rotation.py)
    kv_swaps_out: int = 0  # rotations since the worker started: copies to the host tier
    kv_swaps_in: int = 0  # and back
    kv_swap_out_bytes: int = 0
    kv_swap_in_bytes: int = 0
    kv_rotation_stalls: int = 0  # rotated sequences back later than their TPOT slack allowed



class ControlUpdate(msgspec.Struct, omit_defaults=True):
    """controller -> worker (`c2c.control.<id>`): new knob values for the engine."""

    worker_id: str
    chunk_size: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    decode_threshold: int | None = None
    rho_cap: float | None = None
    t_s: float = 0.0

    def knobs(self) -> dict[str, Any]:
        """The engine knobs set in this update (for Engine.set_control)."""
        names = ("chunk_size", "max_num_seqs", "max_num_batched_tokens", "decode_threshold")
        knobs = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.rho_cap is not None:  # the slice serves at most this fraction from its cache
            knobs["rho"] = self.rho_cap
        return knobs


class ResidencyCommand(msgspec.Struct, omit_defaults=True):
    """placer/operator -> worker (`c2c.worker.<id>.residency`): prewarm or evict a model."""

    worker_id: str
    action: ResidencyAction
    model_id: str
    fraction: float = 1.0  # prewarm: target cached fraction (rho)


class WorkerInfo(msgspec.Struct, omit_defaults=True):
    """The heartbeat record of one worker (`c2c:worker:<id>`, TTL)."""

    worker_id: str
    node: str = ""
    gpu: str = ""
    slice_profile: str = ""
    memory_bytes: int = 0
    backend: str = "cpu"
    residency: str = "host"
    pinned_models: list[str] = []
    started_s: float = 0.0
    private_weight_bytes: int = 0  # weights copied into the worker's own memory ("load" mode)


class ModelEntry(msgspec.Struct, omit_defaults=True):
    """A catalog entry (`c2c:model:<id>`): where a model's checkpoint lives."""

    model_id: str
    path: str
    arch: str = ""
    nbytes: int = 0
    owner: str = "public"
    context_window: int = 0
    created_s: int = 0
    slo_class: str = ""  # the model's default request class (services/slo.py); "": standard
    ttft_slo_ms: float = 0.0  # the model's SLO for a standard request; 0: the system default
    tpot_slo_ms: float = 0.0


class MigrateCommand(msgspec.Struct, omit_defaults=True):
    """placer / a draining worker -> the source worker (`c2c.worker.<id>.migrate`): move one
    running request, with its KV cache, to another worker (live migration)."""

    request_id: str  # "": the source picks (the decoding request with the most tokens to go)
    target_worker_id: str = ""  # "": any live worker serving the model (same node first)
    transport: str = ""  # "shm" | "net" | "": shared memory when both are on one node


class MigrationResult(msgspec.Struct, omit_defaults=True):
    """source worker -> the reply of a MigrateCommand."""

    request_id: str
    is_moved: bool = False
    target_worker_id: str = ""
    transport: str = ""
    error: str = ""
    total_ms: float = 0.0  # the offer to the target's acknowledgement
    stop_ms: float = 0.0  # the request detached to the target's acknowledgement (no tokens then)
    phases_ms: dict[str, float] = {}  # offer, precopy, detach, flush, commit (stop = the last three)


class MigrationOffer(msgspec.Struct, omit_defaults=True):
    """source -> target (`c2c.worker.<id>.migrate_offer`, request/reply `MigrationReply`):
    reserve KV blocks for a request that will arrive with its KV."""

    migration_id: str
    request_id: str
    model_id: str
    source_worker_id: str
    num_tokens: int  # the context the target must hold
    kv_layout: list[int] = []  # [num_layers, block_size, num_kv_heads, head_dim, bytes per element]
    transport: str = "net"
    shm_num_blocks: int = 0  # "shm": room of the file the source writes blocks into (named by migration_id)


class KVBlocks(msgspec.Struct, omit_defaults=True):
    """source -> target (`c2c.worker.<id>.migrate_kv`, request/reply `MigrationReply`): the
    request's KV blocks first_block.. (in its block table's order). `k`/`v` carry the bytes
    ([num_layers, num_blocks, block_size, num_kv_heads, head_dim]); empty: they are in the
    offer's shared memory file at the same block positions."""

    migration_id: str
    first_block: int
    num_blocks: int
    k: bytes = b""
    v: bytes = b""


class MigratedRequest(msgspec.Struct, omit_defaults=True):
    """A running request's engine state: tokens, sampling, detokenizer, SLOs (worker.handover)."""

    request_id: str
    model_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: dict[str, Any]  # worker.engine.SamplingParams as a dict
    arrival_s: float
    ttft_slo_s: float
    tpot_slo_s: float
    tenant: str = ""
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_sent_chars: int = 0  # text already streamed
    are_stops_active: bool = False  # stop strings are checked (min_tokens reached)
    generator_state: bytes = b""  # a seeded request's torch.Generator state


class MigrationCommit(msgspec.Struct, omit_defaults=True):
    """source -> target (`c2c.worker.<id>.migrate_commit`, request/reply `MigrationReply`):
    the source stopped the request; the tail of its KV and its state. The target resumes it
    and streams to `reply` in the same epoch from chunk `seq` on."""

    migration_id: str
    request: MigratedRequest
    tail: KVBlocks
    reply: str
    epoch: int
    seq: int  # the next chunk's index in this epoch
    arrival_s: float = 0.0
    num_resumed: int = 0
    num_skip_chars: int = 0
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0


class MigrationCancel(msgspec.Struct, omit_defaults=True):
    """source -> target (`c2c.worker.<id>.migrate_cancel`): give the reserved blocks back."""

    migration_id: str


class MigrationReply(msgspec.Struct, omit_defaults=True):
    """target -> source: the answer to an offer, a KV message or a commit."""

    is_ok: bool
    error: str = ""
    work_ms: float = 0.0  # a commit: the target's time to resume the request (its engine thread's wait included)


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(message: msgspec.Struct) -> bytes:
    """msgpack bytes of a message."""
    return _encoder.encode(message)


def decoder(message_type: type[T]) -> msgspec.msgpack.Decoder:
    """The one typed decoder for a message type (cached)."""
    dec = _decoders.get(message_type)
    if dec is None:
        dec = _decoders[message_type] = msgspec.msgpack.Decoder(message_type)
    return dec


def decode(message_type: type[T], data: bytes) -> T:
    """Decode `data` as `message_type`; raises msgspec.ValidationError/DecodeError."""
    return decoder(message_type).decode(data)


def to_json_dict(message: msgspec.Struct) -> dict[str, Any]:
    """A plain dict (for Redis hashes and logs)."""
    return msgspec.to_builtins(message)
