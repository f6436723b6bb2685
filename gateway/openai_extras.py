"""The OpenAI parameters past plain sampling, with vLLM's semantics (no I/O).

Parsing: `n`, prompt arrays (a list of strings or of token-id lists: one choice per prompt
and sample, index `prompt_index * n + sample_index` as vLLM numbers them), the three
penalties, `logit_bias`, `min_tokens`, `stop_token_ids`, `logprobs` / `top_logprobs`,
`echo`, `response_format` (json_object / json_schema, checked by the grammar library so a
schema it cannot enforce is a 400 here). Every bad value raises `InvalidRequest` naming
its parameter.

n > 1 runs as n requests of their own (each `SubmitRequest` gets the id `<id>-<index>`
and, with a seed, the seed `seed + index`), as vLLM's ParentRequest splits a request into
child requests: each one is placed, fenced and re-dispatched on its own, and the gateway
merges their chunks into one response. Children on one worker share their prompt's KV: the
worker's scheduler hands a waiting sequence the computed full KV blocks of a running one
with the same prefix (worker/scheduler.py `_share_prefix`), so the prompt is prefilled once
and each sample computes only the last partial block.

Formatting: the logprobs objects of chat (`{"content": [{token, logprob, bytes,
top_logprobs}]}`) and of legacy completions (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), from the workers' `TokenLogprob`s (log-softmax of the raw logits; tokens
decoded one by one, as vLLM's `convert_ids_list_to_tokens`).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from services.errors import InvalidRequest
from services.schemas import RequestKind, SubmitRequest, TokenLogprob

MAX_N = 128  # OpenAI's bound on n
MAX_CHOICES = 128  # prompts x n in one request: each is a request of its own
MAX_LOGPROBS = 20  # vLLM's default max_logprobs (the worker's sampling.MAX_LOGPROBS)
MAX_LOGIT_BIAS = 1024  # entries
MAX_STOP_TOKEN_IDS = 64
MAX_MIN_TOKENS = 2**31 - 1
NEG_INF_LOGPROB = -9999.0  # what vLLM writes for a logprob of -inf (JSON has no -Infinity)


def parse_extras(kind: RequestKind, body: dict, get_int, get_float, get) -> dict[str, Any]:
    """SubmitRequest fields of the extras (the caller's _get_int/_get_float/_get check types)."""
    extras = {
        "presence_penalty": get_float(body, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": get_float(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "repetition_penalty": get_float(body, "repetition_penalty", 0.0, 100.0, 1.0, low_open=True),
        "logit_bias": _parse_logit_bias(body),
        "stop_token_ids": _parse_stop_token_ids(body),
        "logprobs": _parse_logprobs(kind, body, get_int, get),
        "json_schema": parse_response_format(body),
    }
    extras["min_tokens"] = get_int(body, "min_tokens", 0, MAX_MIN_TOKENS, 0)
    if kind == RequestKind.COMPLETION:
        extras["echo"] = get(body, "echo", bool, False)
        if extras["echo"] and extras["logprobs"] >= 0:
            raise InvalidRequest("'echo' with 'logprobs' (the prompt's logprobs) is not supported", param="echo")
    return extras


def _parse_logit_bias(body: dict) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise InvalidRequest("'logit_bias' must be an object mapping token ids to numbers", param="logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"'logit_bias' allows at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
    parsed = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < 2**31):
            raise InvalidRequest(f"'logit_bias' keys must be token ids (non-negative integers), got {key[:40]!r}",
                                 param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise InvalidRequest(f"'logit_bias' values must be numbers in [-100, 100], got {str(value)[:40]}",
                                 param="logit_bias")
        parsed[int(key)] = float(value)
    return parsed


def _parse_stop_token_ids(body: dict) -> list[int]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return []
    if (not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in ids)):
        raise InvalidRequest(f"'stop_token_ids' must be an array of at most {MAX_STOP_TOKEN_IDS} token ids",
                             param="stop_token_ids")
    return ids


def _parse_logprobs(kind: RequestKind, body: dict, get_int, get) -> int:
    """-1: none; k: the sampled token's logprob and the top k."""
    if kind == RequestKind.COMPLETION:
        value = get_int(body, "logprobs", 0, MAX_LOGPROBS)
        return -1 if value is None else value
    is_on = get(body, "logprobs", bool, False)
    num_top = get_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if num_top is not None and num_top > 0 and not is_on:
        raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    return (num_top or 0) if is_on else -1


def parse_response_format(body: dict) -> str:
    """The JSON schema (text) the output must follow; "" for free text."""
    rf = body.get("response_format")
    if rf is None:
        return ""
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return ""
    from worker.constrained import JSON_OBJECT_SCHEMA, compile_json_schema, schema_text

    if kind == "json_object":
        return schema_text(JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("'response_format.json_schema.schema' must be a JSON schema object",
                                 param="response_format")
        compile_json_schema(schema)  # InvalidRequest for a schema it cannot enforce
        return schema_text(schema)
    raise InvalidRequest("'response_format' must be an object whose type is 'text', 'json_object' or "
                         "'json_schema'", param="response_format")


def parse_prompts(body: dict, is_token_id) -> list[tuple[str | None, list[int] | None]]:
    """Completions' prompts: a string, token ids, or an array of either (not mixed)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        return [(prompt, None)]
    if isinstance(prompt, list) and prompt:
        if all(is_token_id(t) for t in prompt):
            return [(None, prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [(p, None) for p in prompt]
        if all(isinstance(p, list) and p and all(is_token_id(t) for t in p) for p in prompt):
            return [(None, p) for p in prompt]
    raise InvalidRequest("'prompt' must be a string, a non-empty array of token ids (integers in [0, 2**31)), "
                         "or an array of either", param="prompt")


def choice_submits(submit: SubmitRequest, prompts: list[tuple[str | None, list[int] | None]], n: int) -> list[SubmitRequest]:
    """One SubmitRequest per choice, in choice order (prompt_index * n + sample_index)."""
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidRequest(f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} choices; at most "
                             f"{MAX_CHOICES} fit one request", param="n" if n > 1 else "prompt")
    if len(prompts) == 1 and n == 1:
        return [_with_prompt(submit, *prompts[0])]
    submits = []
    for prompt_index, (text, ids) in enumerate(prompts):
        for sample_index in range(n):
            index = prompt_index * n + sample_index
            seed = None if submit.seed is None else _wrap_seed(submit.seed + sample_index)
            child = msgspec.structs.replace(submit, request_id=f"{submit.request_id}-{index}", seed=seed)
            submits.append(_with_prompt(child, text, ids))
    return submits


def _wrap_seed(seed: int) -> int:
    return seed if seed < 2**63 else seed - 2**64  # seed + index stays a signed 64-bit value


def _with_prompt(submit: SubmitRequest, text: str | None, ids: list[int] | None) -> SubmitRequest:
    if submit.kind == RequestKind.CHAT:
        return submit
    num_chars = len(text) if text is not None else 4 * len(ids)
    return msgspec.structs.replace(submit, prompt=text, prompt_token_ids=ids, num_prompt_chars=num_chars)


# -- logprobs objects ------------------------------------------------------------------------
def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NEG_INF_LOGPROB


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """Chat's `logprobs` object of a choice (or of a stream chunk's tokens)."""
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": _value(logprob), "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in zip(e.top_tokens, e.top_logprobs, strict=True)]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], initial_offset: int = 0) -> dict:
    """Legacy completions' `logprobs` object; text_offset counts characters from the text's
    start (after an echoed prompt), one token's decoded text after another, as vLLM does."""
    offsets, offset = [], initial_offset
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    tops = []
    for e in entries:
        top = {t: _value(lp) for t, lp in zip(e.top_tokens, e.top_logprobs, strict=True)}
        top.setdefault(e.token, _value(e.logprob))  # the sampled token is always there (k + 1 at most)
        tops.append(top)
    return {"tokens": [e.token for e in entries], "token_logprobs": [_value(e.logprob) for e in entries],
            "top_logprobs": tops, "text_offset": offsets}
