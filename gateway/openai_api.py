"""OpenAI request validation and response formatting (no I/O).

`decode_body(raw)` parses a body as strict JSON (finite numbers, bounded depth, text that
UTF-8 can carry); `parse_request(kind, body)` turns it into a `ParsedRequest` or raises
`InvalidRequest` naming the parameter (wrong type, value out of its range, which the
message states). Unknown parameters are ignored, as vLLM does, and named in the response's
`X-Ignored-Fields` header (the other endpoint's prompt field is still a 400: the request
would run without its prompt). The parameters past plain sampling (n, prompt arrays,
penalties, logit_bias, logprobs, echo, response_format) are in gateway.openai_extras. `check_context` bounds a request by the model's context
window and `check_bus_size` by what one NATS message carries, so nothing that reaches the
bus can fail to encode. The `*_response` / `*_chunk` functions build OpenAI's wire objects.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from gateway import openai_extras
from services import schemas, slo
from services.errors import ContextLengthExceeded, InvalidRequest, RequestTooLarge
from services.schemas import RequestKind, SubmitRequest, TokenLogprob

DEFAULT_MAX_TOKENS = {RequestKind.COMPLETION: 16, RequestKind.CHAT: 256}
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024
MAX_MODEL_ID_CHARS = 256
MAX_JSON_DEPTH = 64
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# a text prompt with more characters than this per context-window token certainly does not
# fit (no known vocabulary has a token this long); anything shorter is the worker's to count
MAX_CHARS_PER_TOKEN = 1024
# room on the bus for the msgpack envelope and the token ids a re-dispatch appends
ENVELOPE_HEADROOM_BYTES = 64 << 10
_MAX_INT_DIGITS = 40  # longer integers read as +-1e40: out of every range, so the error names the parameter
_SURROGATE = re.compile("[\ud800-\udfff]")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
    "seed", "user", "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "ignore_eos",
    "repetition_penalty", "min_tokens", "stop_token_ids", "response_format", "logprobs",
    "slo_class",  # c2cserve: interactive | standard | batch (services/slo.py)
}
# accepted only at their neutral value: parameter -> allowed values
_NEUTRAL = {
    "best_of": (1, None), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
    "store": (None, False), "metadata": (None, {}),
}
ALLOWED = {
    RequestKind.COMPLETION: _COMMON | {"prompt", "echo", "best_of", "suffix"},
    RequestKind.CHAT: _COMMON | {
        "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
        "parallel_tool_calls", "store", "metadata",
    },
}
# the other endpoint's prompt: ignoring it would run the request without its prompt
_WRONG_ENDPOINT = {RequestKind.COMPLETION: {"messages"}, RequestKind.CHAT: {"prompt"}}
MAX_IGNORED_SHOWN = 16


@dataclass
class ParsedRequest:
    kind: RequestKind
    model: str
    stream: bool
    include_usage: bool
    submit: SubmitRequest
    max_tokens_param: str | None = None  # the parameter that set max_tokens; None: the default
    created: int = field(default_factory=lambda: int(time.time()))
    n: int = 1
    choice_submits: list[SubmitRequest] = field(default_factory=list)  # one per choice, by index
    ignored_fields: list[str] = field(default_factory=list)  # unknown parameters, ignored
    response_id: str = ""  # the id the client sees (the choices' requests have their own)

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    @property
    def id(self) -> str:
        return self.response_id or self.submit.request_id

    @property
    def num_logprobs(self) -> int:
        """-1: no logprobs; k: with the top k."""
        return self.submit.logprobs

    def choices(self) -> list[ParsedRequest]:
        """One request per choice (the request itself when it has one choice): `submit` as it
        is now (tenant, SLO set since parsing) with the choice's id, seed and prompt."""
        if len(self.choice_submits) <= 1:
            return [self]
        return [replace(self, submit=msgspec.structs.replace(
                    self.submit, request_id=s.request_id, seed=s.seed, prompt=s.prompt,
                    prompt_token_ids=s.prompt_token_ids, num_prompt_chars=s.num_prompt_chars),
                    choice_submits=[], response_id=self.id) for s in self.choice_submits]


_ID_PREFIX = uuid.uuid4().hex[:16]  # unique per gateway process; a counter makes each id unique
_id_counter = itertools.count()


def new_request_id(kind: RequestKind) -> str:
    prefix = "chatcmpl" if kind == RequestKind.CHAT else "cmpl"
    return f"{prefix}-{_ID_PREFIX}{next(_id_counter):08x}"


# -- the body: strict JSON ------------------------------------------------------------------
def decode_body(raw: bytes, content_type: str = "") -> Any:
    """The JSON value of a request body; InvalidRequest for what is not JSON or cannot travel
    (invalid UTF-8, lone surrogates, nesting past MAX_JSON_DEPTH). Numbers past every range
    (NaN, 1e400, 5,000 digits) are left to the parameter checks, which name the parameter."""
    if not raw.strip():
        raise InvalidRequest("the request body is empty: send a JSON object (Content-Type: application/json)")
    try:
        body = json.loads(raw, parse_constant=_bounded_float, parse_float=_bounded_float, parse_int=_bounded_int)
    except RecursionError:
        raise InvalidRequest(f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        hint = "" if "json" in content_type else f" (Content-Type was {content_type or 'missing'!r})"
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}{hint}") from None
    _check_tree(body)
    return body


def _bounded_float(text: str) -> float:
    """NaN, Infinity (not JSON, but sent) and 1e400 read as NaN or +-max: out of every range
    a parameter accepts, so the error names the parameter."""
    value = float(text)
    return value if math.isfinite(value) or value != value else math.copysign(sys.float_info.max, value)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        return -(10**_MAX_INT_DIGITS) if text.startswith("-") else 10**_MAX_INT_DIGITS
    return int(text)


def _check_tree(body: Any) -> None:
    """Depth bound and UTF-8-encodable text, over every key and value (iteratively)."""
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        value, depth, param = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", param=param)
        if isinstance(value, str):
            _check_text(value, param)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, param)  # a bad top-level key is named by no param: never echoed
                stack.append((item, depth + 1, param or key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, param) for item in value if isinstance(item, (str, dict, list)))


def _check_text(text: str, param: str | None) -> None:
    if not text.isascii() and _SURROGATE.search(text):
        where = f"'{param}'" if param else "the body"
        raise InvalidRequest(f"{where} contains a lone UTF-16 surrogate (\\ud800-\\udfff): text must be valid "
                             "Unicode", param=param)


# -- parameters ------------------------------------------------------------------------------
def _get(body: dict, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidRequest(f"'{name}' must be {_type_name(kinds)}, not a boolean", param=name)
    if not isinstance(value, kinds):
        raise InvalidRequest(f"'{name}' must be {_type_name(kinds)}, got {type(value).__name__}", param=name)
    return value


def _type_name(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _get_int(body: dict, name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = _get(body, name, int, default)
    if value is not None and not low <= value <= high:
        shown = value if abs(value) < 10**_MAX_INT_DIGITS else f"a number of more than {_MAX_INT_DIGITS} digits"
        raise InvalidRequest(f"'{name}' must be an integer in [{low}, {high}], got {shown}", param=name)
    return value


def _get_float(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = _get(body, name, (int, float), default)
    try:
        value = float(value)
    except OverflowError:
        value = math.copysign(math.inf, value)
    if not (low < value <= high if low_open else low <= value <= high):
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise InvalidRequest(f"'{name}' must be a number in {interval}, got {value:g}", param=name)
    return value


def _check_parameters(kind: RequestKind, body: dict) -> list[str]:
    """The unknown parameters (ignored, as vLLM does); InvalidRequest for the other
    endpoint's prompt and for a supported-at-default-only parameter set otherwise."""
    for name in _WRONG_ENDPOINT[kind] & body.keys():
        other = "/v1/completions" if kind == RequestKind.CHAT else "/v1/chat/completions"
        raise InvalidRequest(f"'{name}' belongs to {other}", param=name)
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise InvalidRequest(f"'{name}' is not supported (only its default value)", param=name)
    return [name for name in body if name not in ALLOWED[kind]]


def ignored_fields_header(names: list[str]) -> str:
    """The X-Ignored-Fields value: the names as printable ASCII (escaped), bounded."""
    shown = [ascii(name)[1:-1].replace(",", "\\x2c")[:100] for name in names[:MAX_IGNORED_SHOWN]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def check_model_id(model: str | None) -> str:
    """A model id that can be looked up: present, not too long, valid Unicode."""
    if not model:
        raise InvalidRequest("'model' is required", param="model")
    if len(model) > MAX_MODEL_ID_CHARS:
        raise InvalidRequest(f"'model' must be at most {MAX_MODEL_ID_CHARS} characters", param="model")
    _check_text(model, "model")
    return model


def _parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("'stop' must be a non-empty string or an array of them", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"'stop' allows at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidRequest(f"a 'stop' sequence must be at most {MAX_STOP_CHARS} characters", param="stop")
    return stop


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidRequest(f"messages[{index}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"messages[{index}].content must be a string or an array of text parts", param="messages")


def _parse_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}] must be an object with a role in {', '.join(CHAT_ROLES)}", param="messages")
        parsed.append({"role": message["role"], "content": _content_text(message.get("content"), i)})
    return parsed


def _parse_max_tokens(kind: RequestKind, body: dict) -> tuple[int, str | None]:
    """(max_tokens, the parameter that set it or None for the default)."""
    for name in ("max_completion_tokens", "max_tokens") if kind == RequestKind.CHAT else ("max_tokens",):
        value = _get_int(body, name, 1, INT32_MAX)
        if value is not None:
            return value, name
    return DEFAULT_MAX_TOKENS[kind], None


def _parse_sampling(body: dict) -> dict[str, Any]:
    is_off = type(body.get("top_k")) is int and body["top_k"] == -1  # -1: off, as 0 is
    top_k = 0 if is_off else _get_int(body, "top_k", 0, INT32_MAX, 0)
    return {
        "temperature": _get_float(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _get_float(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
        "top_k": top_k,
        "seed": _get_int(body, "seed", INT64_MIN, INT64_MAX),
        "ignore_eos": _get(body, "ignore_eos", bool, False),
    }


def _parse_stream(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    options = options or {}
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise InvalidRequest(f"Unrecognized stream option: {sorted(unknown)[0][:100]}", param="stream_options")
    include_usage = _get(options, "include_usage", bool, False)
    return stream, include_usage


def parse_request(kind: RequestKind, body: Any) -> ParsedRequest:
    """Validate an OpenAI request body; raises InvalidRequest naming the bad parameter."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {'null' if body is None else _type_name(type(body))}")
    ignored = _check_parameters(kind, body)
    model = check_model_id(_get(body, "model", str))
    n = _get_int(body, "n", 1, openai_extras.MAX_N, 1)
    stream, include_usage = _parse_stream(body)
    max_tokens, max_tokens_param = _parse_max_tokens(kind, body)
    extras = openai_extras.parse_extras(kind, body, _get_int, _get_float, _get)
    if extras["min_tokens"] > max_tokens:
        raise InvalidRequest(f"'min_tokens' ({extras['min_tokens']}) must not exceed {max_tokens_param or 'max_tokens'} "
                             f"({max_tokens})", param="min_tokens")
    submit = SubmitRequest(
        request_id=new_request_id(kind), model_id=model, kind=kind, max_tokens=max_tokens,
        stop=_parse_stop(body), arrival_s=time.time(), **_parse_sampling(body), **extras,
    )
    if kind == RequestKind.CHAT:
        submit.messages = _parse_messages(body)
        submit.num_prompt_chars = sum(len(m["content"]) for m in submit.messages)
        prompts = [(None, None)]
    else:
        prompts = openai_extras.parse_prompts(body, _is_token_id)
    submit.slo_class = slo.parse_slo_class(body.get("slo_class")) or ""  # resolved against the catalog later
    choice_submits = openai_extras.choice_submits(submit, prompts, n)
    _get(body, "user", str)
    return ParsedRequest(kind=kind, model=model, stream=stream, include_usage=include_usage, submit=choice_submits[0],
                         max_tokens_param=max_tokens_param, n=n, choice_submits=choice_submits, ignored_fields=ignored,
                         response_id=submit.request_id)


# -- bounds of the model and of the bus ------------------------------------------------------
def check_context(req: ParsedRequest, context_window: int) -> None:
    """Reject what certainly cannot fit the model's context window (0: unknown, no check)."""
    if context_window <= 0:
        return
    submit, param = req.submit, req.max_tokens_param or "max_tokens"
    if submit.max_tokens > context_window:
        if req.max_tokens_param is None:
            submit.max_tokens = context_window  # the default never exceeds the window
        else:
            raise InvalidRequest(f"'{param}' must be an integer in [1, {context_window}] ({req.model}'s context "
                                 f"window), got {submit.max_tokens}", param=param)
    ids = submit.prompt_token_ids
    if ids is not None:
        if len(ids) >= context_window:
            raise ContextLengthExceeded(f"prompt has {len(ids)} tokens; {req.model}'s context window is "
                                        f"{context_window} tokens", param="prompt")
        if len(ids) + submit.max_tokens > context_window:
            raise ContextLengthExceeded(f"prompt ({len(ids)} tokens) + {param} ({submit.max_tokens}) exceeds "
                                        f"{req.model}'s context window of {context_window} tokens", param=param)
    elif submit.num_prompt_chars > context_window * MAX_CHARS_PER_TOKEN:
        raise ContextLengthExceeded(f"the prompt has {submit.num_prompt_chars} characters: more tokens than "
                                    f"{req.model}'s context window of {context_window} tokens",
                                    param="messages" if req.kind == RequestKind.CHAT else "prompt")


def max_body_bytes(max_payload_bytes: int) -> int:
    """The largest body the gateway reads: what one bus message carries, less the envelope."""
    return max(0, max_payload_bytes - ENVELOPE_HEADROOM_BYTES)


def check_bus_size(submit: SubmitRequest, max_payload_bytes: int) -> None:
    """The encoded request fits one bus message with headroom (and encodes at all)."""
    try:
        num_bytes = len(schemas.encode(submit))
    except (OverflowError, UnicodeEncodeError, TypeError, msgspec.EncodeError) as exc:
        raise InvalidRequest(f"the request cannot be encoded: {exc}") from None
    if num_bytes > max_body_bytes(max_payload_bytes):
        raise RequestTooLarge(f"the request encodes to {num_bytes} bytes; at most "
                              f"{max_body_bytes(max_payload_bytes)} fit on the message bus")


# -- responses -------------------------------------------------------------------------------
def usage(num_prompt_tokens: int, num_generated_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens, "completion_tokens": num_generated_tokens,
        "total_tokens": num_prompt_tokens + num_generated_tokens,
    }


@dataclass
class ChoiceOutput:
    """What one choice produced: its text, finish reason and tokens' logprobs."""

    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0  # completions: characters before this text (the echoed prompt, earlier chunks)


def logprobs_object(req: ParsedRequest, out: ChoiceOutput) -> dict | None:
    if req.num_logprobs < 0:
        return None
    if req.kind == RequestKind.CHAT:
        return openai_extras.chat_logprobs(out.logprobs)
    return openai_extras.completion_logprobs(out.logprobs, out.offset)


def full_response(req: ParsedRequest, outputs: list[ChoiceOutput], usage_: dict) -> dict:
    """The non-streaming response object, one choice per output (in index order)."""
    choices = []
    for index, out in enumerate(outputs):
        if req.kind == RequestKind.CHAT:
            choices.append({"index": index, "message": {"role": "assistant", "content": out.text},
                            "logprobs": logprobs_object(req, out), "finish_reason": out.finish_reason})
        else:
            choices.append({"index": index, "text": out.text, "logprobs": logprobs_object(req, out),
                            "finish_reason": out.finish_reason})
    obj = "chat.completion" if req.kind == RequestKind.CHAT else "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model,
            "choices": choices, "usage": usage_}


def stream_chunk(req: ParsedRequest, text: str | None, finish_reason: str | None,
                 first: bool = False, index: int = 0, out: ChoiceOutput | None = None) -> dict:
    """One SSE chunk with one choice: a text delta (with its tokens' logprobs) and/or the
    finish reason."""
    logprobs = logprobs_object(req, out) if out is not None and out.logprobs else None
    if req.kind == RequestKind.CHAT:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    chunk = {"id": req.id, "object": obj, "created": req.created, "model": req.model,
             "choices": [choice]}
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(req: ParsedRequest, usage_: dict) -> dict:
    """The extra last chunk of stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if req.kind == RequestKind.CHAT else "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model,
            "choices": [], "usage": usage_}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
