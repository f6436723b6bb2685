"""A request's prompt ids, prepared off the engine thread.

Tokenizing a long prompt (or rendering a chat template) took the engine thread, and with
it every running request's next step, for as long as it lasted. The engine loop hands a
submit to `Admission` (one thread of its own) and admits the request when its ids are
ready; `Engine.tokenize_request` is bounded by the context window and releases the GIL.
A re-dispatched request's prompt is its original prompt plus the streamed tokens whose
text the client fully got (the rest is generated again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from services.errors import C2CError, ErrorCode
from services.schemas import RequestKind, SubmitRequest

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    token_ids: list[int]
    num_resumed: int = 0  # streamed tokens kept as prompt (re-dispatch)
    num_skip_chars: int = 0  # text the client already has that will be generated again


def prepare(engine, req: SubmitRequest) -> Prepared:
    """The prompt ids of a submit; raises C2CError for bad input (thread-safe)."""
    chat = req.messages if req.kind == RequestKind.CHAT else None
    ids = engine.tokenize_request(req.model_id, prompt=None if chat else req.prompt,
                                  prompt_token_ids=None if chat else req.prompt_token_ids, messages=chat)
    if not req.resumed_token_ids:
        return Prepared(ids)
    return _resumed(engine, req, ids)


def _resumed(engine, req: SubmitRequest, ids: list[int]) -> Prepared:
    """Keep the longest run of streamed tokens whose text the client fully got; tokens
    whose text was held back (a UTF-8 character cut in two) are generated again."""
    from worker.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(engine.tokenizer(req.model_id), ids)
    num_chars = num_chars_kept = num_resumed = 0
    for i, token_id in enumerate(req.resumed_token_ids):
        delta = detok.add(token_id)  # '' while a character's bytes are incomplete
        num_chars += len(delta)
        if delta and num_chars <= req.resumed_num_chars:
            num_resumed, num_chars_kept = i + 1, num_chars
    log.info("[req=%s] resumed after %d of %d streamed tokens", req.request_id, num_resumed,
             len(req.resumed_token_ids))
    return Prepared(ids + list(req.resumed_token_ids[:num_resumed]), num_resumed,
                    req.resumed_num_chars - num_chars_kept)


class Admission:
    """prepare() in one background thread; `done(req, reply, Prepared | C2CError)` after."""

    def __init__(self, engine, worker_id: str, done: Callable[[SubmitRequest, str, Prepared | C2CError], None]):
        self.engine = engine
        self.done = done
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"admit-{worker_id}")

    def submit(self, req: SubmitRequest, reply: str) -> None:
        self._pool.submit(self._run, req, reply)

    def _run(self, req: SubmitRequest, reply: str) -> None:
        try:
            result: Prepared | C2CError = prepare(self.engine, req)
        except C2CError as exc:
            result = exc
        except Exception as exc:  # a bug: this request fails, the worker goes on
            log.exception("[req=%s] preparing the prompt failed", req.request_id)
            result = C2CError(f"preparing the prompt failed: {exc}", code=ErrorCode.INTERNAL)
        self.done(req, reply, result)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
