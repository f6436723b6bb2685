"""Constrained decoding for `response_format` (json_object, json_schema), over llguidance.

Why llguidance (guidance-ai/llguidance, one of vLLM's structured-output backends): its
wheel is one self-contained Rust extension with no Python dependencies (3 MB), so it is a
base dependency and nothing heavy is imported optionally. xgrammar 0.2.8, the other
candidate, requires `transformers`, `triton` and `apache-tvm-ffi` at install (our
transformers is a test-only dependency and triton is hundreds of MB of GPU compiler a CPU
slice never uses); `--no-deps` would leave it importing modules we do not ship.
llguidance builds its tokenizer straight from `tokenizer.json` (which our `Tokenizer`
already holds through the `tokenizers` package), compiles a JSON schema to a grammar, and
computes each step's allowed-token mask in Rust with the GIL released.

`compile_json_schema(text)` checks a schema and returns llguidance's grammar (the gateway
calls it to answer 400 before anything is queued); `GrammarMatcher(tokenizer, grammar)`
holds one request's parser state: `allowed(vocab_size)` is the mask of the next token,
`accept(token_id)` advances it, `is_finished` says the grammar is complete.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from services.errors import InvalidRequest

JSON_OBJECT_SCHEMA = {"type": "object"}  # response_format json_object: any JSON object
# JSON without free whitespace between tokens (as vLLM's `disable_any_whitespace`): a model
# can otherwise emit blanks until max_tokens, and the output is the same JSON value
_COMPACT = {"whitespace_flexible": False}
_tokenizers: dict[int, Any] = {}  # id(worker Tokenizer) -> llguidance.LLTokenizer
_lock = threading.Lock()
MAX_CACHED_MATCHERS = 64
# (id(tokenizer), schema) -> (tokenizer, a fresh matcher): each request takes a deep copy, so a
# schema is compiled once per worker (the n samples of a request, a client's repeated schema)
_matchers: OrderedDict[tuple[int, str], tuple[Any, Any]] = OrderedDict()


def compile_json_schema(schema: dict | str) -> str:
    """llguidance's grammar of a JSON schema; InvalidRequest(param="response_format") when
    the schema is not one it can enforce."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"response_format: the JSON schema is invalid: {exc}", param="response_format") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise InvalidRequest(f"response_format: the JSON schema cannot be enforced: {error}", param="response_format")
    return grammar


def schema_text(schema: dict) -> str:
    """A schema as compact JSON text (what travels in SubmitRequest.json_schema)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _ll_tokenizer(tokenizer) -> Any:
    """One llguidance tokenizer per worker tokenizer (built once: ~1 s for big vocabularies)."""
    import llguidance

    with _lock:
        found = _tokenizers.get(id(tokenizer))
        if found is None or found[0] is not tokenizer:
            text = (tokenizer.model_dir / "tokenizer.json").read_text(encoding="utf-8")
            ll = llguidance.LLTokenizer(text, n_vocab=tokenizer.vocab_size,
                                        eos_token=list(tokenizer.eos_token_ids) or None)
            found = _tokenizers[id(tokenizer)] = (tokenizer, ll)
        return found[1]


def _fresh_matcher(tokenizer, schema: str):
    """A matcher of `schema` in its start state, compiled once per (tokenizer, schema)."""
    import llguidance

    key = (id(tokenizer), schema)
    with _lock:
        found = _matchers.get(key)
        if found is not None and found[0] is tokenizer:
            _matchers.move_to_end(key)
            return found[1]
    matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), compile_json_schema(schema), log_level=0)
    if matcher.is_error():
        raise InvalidRequest(f"response_format: {matcher.get_error()}", param="response_format")
    with _lock:
        _matchers[key] = (tokenizer, matcher)
        while len(_matchers) > MAX_CACHED_MATCHERS:
            _matchers.popitem(last=False)
    return matcher


class GrammarMatcher:
    """One request's grammar state (engine thread only)."""

    def __init__(self, tokenizer, schema: str):
        self._end_ids = list(tokenizer.eos_token_ids)
        self._matcher = _fresh_matcher(tokenizer, schema).deep_copy()

    def allowed(self, vocab_size: int):
        """A bool tensor [vocab_size]: the tokens the grammar accepts next (ids past the
        tokenizer's vocabulary never are)."""
        import numpy as np
        import torch

        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(vocab_size, dtype=torch.bool)  # [V]
        num = min(vocab_size, bits.shape[0])
        mask[:num] = torch.from_numpy(bits[:num].astype(np.bool_))
        if not bool(mask.any()):  # an error state: only the end of the text may follow
            mask[[t for t in self._end_ids if t < vocab_size]] = True
        return mask

    def accept(self, token_id: int) -> bool:
        return self._matcher.consume_token(int(token_id))

    @property
    def is_finished(self) -> bool:
        """The grammar is complete: nothing but its end may follow."""
        return self._matcher.is_stopped()
