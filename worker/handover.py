"""Live migration, engine side: a running request leaves one engine with its KV cache and
goes on in another exactly where it stopped.

Source: `detach` takes a decoding request out of the scheduler at a step boundary; its
Sequence keeps its KV blocks (it is parked) until the target has it: then `release` frees
them, or `reattach` puts the request back (the target failed). Target: `reserve` takes
KV blocks for it ahead, the blocks arrive (`ModelRunner.import_kv`, from another thread:
nobody else uses reserved blocks), `attach` makes it a running sequence with the same
tokens, sampling state and detokenizer state, so its next token is the one the source
would have sampled. Only the engine thread calls these functions.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from services.schemas import MigratedRequest
from worker.block_manager import num_blocks_for
from worker.sequence import Sequence, SequenceStatus
from worker.tokenizer import TextStream


class HandoverError(RuntimeError):
    """This request cannot move now (not decoding, a grammar, no room on the target...)."""


@dataclass
class Parked:
    """A detached request on the source: its Sequence still holds its KV blocks."""

    request: object  # engine._Request (seq + text)
    num_preemptions: int  # when detached: a pre-copy made before a preemption is stale

    @property
    def seq(self) -> Sequence:
        return self.request.seq


@dataclass
class Reservation:
    """KV blocks a target holds for a request on its way (a sequence in nothing but name)."""

    migration_id: str
    model_id: str
    block_table: list[int] = field(default_factory=list)
    last_active_s: float = field(default_factory=time.monotonic)


def computed_block_ids(seq: Sequence, block_size: int, full_only: bool) -> list[int]:
    """The blocks holding the sequence's KV (only the full ones: those no step writes again)."""
    num_tokens = seq.num_computed_tokens
    num_blocks = num_tokens // block_size if full_only else num_blocks_for(num_tokens, block_size)
    return list(seq.block_table[:num_blocks])


# -- source -------------------------------------------------------------------------------
def check_movable(engine, request_id: str) -> Sequence:
    """The request's sequence if it can move now; HandoverError why not."""
    req = engine._requests.get(request_id)
    if req is None or req.seq.is_finished:
        raise HandoverError(f"request {request_id} is not running here")
    seq = req.seq
    if seq.status != SequenceStatus.RUNNING or seq.num_computed_tokens != seq.num_tokens - 1:
        raise HandoverError(f"request {request_id} is not decoding (prefill or preempted)")
    if seq.params.json_schema:
        raise HandoverError(f"request {request_id} follows a JSON schema (its grammar state stays here)")
    return seq


def detach(engine, request_id: str) -> tuple[MigratedRequest, Parked]:
    """Take a decoding request out of the engine, its KV kept; its state for the target."""
    seq = check_movable(engine, request_id)
    req = engine._requests.pop(request_id)
    engine.scheduler.running.remove(seq)
    state = MigratedRequest(
        request_id, seq.model_id, list(seq.token_ids), seq.num_prompt_tokens, dataclasses.asdict(seq.params),
        seq.arrival_s, seq.ttft_slo_s, seq.tpot_slo_s, seq.tenant, seq.first_token_s, seq.last_token_s,
        req.text.num_sent_chars, bool(req.text.stops), engine.runner.sampler.generator_state(request_id))
    return state, Parked(req, seq.num_preemptions)


def reattach(engine, parked: Parked) -> None:
    """The target did not take it: the request runs here again as if nothing happened."""
    engine._requests[parked.seq.request_id] = parked.request
    engine.scheduler.running.append(parked.seq)


def release(engine, parked: Parked) -> None:
    """The target has it: free its blocks and sampling state here."""
    seq = parked.seq
    engine.scheduler.block_managers[seq.model_id].free(seq)
    seq.status = SequenceStatus.FINISHED
    engine.runner.sampler.release(seq.request_id)


# -- target -------------------------------------------------------------------------------
def reserve(engine, migration_id: str, model_id: str, num_tokens: int, kv_layout: list[int]) -> Reservation:
    """Blocks for `num_tokens` of KV of a request on its way; HandoverError if they don't fit."""
    engine._check_model(model_id)
    engine.runner.ensure_loaded(model_id, engine.scheduler.is_model_busy)
    if list(kv_layout) != engine.runner.kv_layout(model_id):
        raise HandoverError(f"KV layout {kv_layout} differs from this worker's {engine.runner.kv_layout(model_id)}")
    reservation = Reservation(migration_id, model_id)
    grow(engine, reservation, num_tokens)
    return reservation


def grow(engine, reservation: Reservation, num_tokens: int) -> None:
    block_manager = engine.scheduler.block_managers[reservation.model_id]
    if not block_manager.can_allocate(reservation, num_tokens):
        raise HandoverError(f"no room for {num_tokens} tokens of KV ({block_manager.num_free_blocks} blocks free)")
    block_manager.allocate(reservation, num_tokens)
    reservation.last_active_s = time.monotonic()


def cancel(engine, reservation: Reservation) -> None:
    engine.scheduler.block_managers[reservation.model_id].free(reservation)


def attach(engine, state: MigratedRequest, reservation: Reservation) -> Sequence:
    """Run the request here, its KV already in the reserved blocks."""
    from worker.engine import SamplingParams, _Request

    if state.request_id in engine._requests:
        raise HandoverError(f"request {state.request_id} already runs here")
    params = SamplingParams(**state.params)
    num_computed = len(state.token_ids) - 1
    grow(engine, reservation, num_computed)
    seq = Sequence(state.request_id, state.model_id, list(state.token_ids), state.num_prompt_tokens, params,
                   state.arrival_s, state.ttft_slo_s, state.tpot_slo_s, status=SequenceStatus.RUNNING,
                   num_computed_tokens=num_computed, block_table=reservation.block_table,
                   first_token_s=state.first_token_s, last_token_s=state.last_token_s, tenant=state.tenant)
    tokenizer = engine.tokenizer(state.model_id)
    text = TextStream(tokenizer, seq.token_ids[: seq.num_prompt_tokens], params.stop if state.are_stops_active else [])
    for token_id in seq.generated_token_ids:
        text.add(token_id)
    text.num_sent_chars = state.num_sent_chars
    engine._requests[seq.request_id] = _Request(seq, text)
    sampler = engine.runner.sampler
    sampler.track(seq.request_id, engine._sample_context(seq))
    if state.generator_state:
        sampler.set_generator_state(seq.request_id, state.generator_state)
    engine.scheduler.running.append(seq)
    return seq
