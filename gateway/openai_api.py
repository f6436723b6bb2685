"""OpenAI request validation and response formatting (no I/O).

`parse_request(kind, body)` turns a decoded JSON body into a `ParsedRequest` or raises
`InvalidRequest` naming the parameter (unknown parameter, wrong type, bad value).
The `*_response` / `*_chunk` functions build OpenAI's exact wire objects.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.errors import InvalidRequest
from services.schemas import RequestKind, SubmitRequest

DEFAULT_MAX_TOKENS = {RequestKind.COMPLETION: 16, RequestKind.CHAT: 256}
MAX_STOP_SEQUENCES = 4
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
    "seed", "user", "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "ignore_eos",
}
# accepted only at their neutral value: parameter -> allowed values
_NEUTRAL = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}), "logprobs": (None, False, 0), "echo": (False, None),
    "best_of": (1, None), "suffix": (None, ""), "top_logprobs": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None, {}),
}
ALLOWED = {
    RequestKind.COMPLETION: _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"},
    RequestKind.CHAT: _COMMON | {
        "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "store", "metadata",
    },
}


@dataclass
class ParsedRequest:
    kind: RequestKind
    model: str
    stream: bool
    include_usage: bool
    submit: SubmitRequest
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def request_id(self) -> str:
        return self.submit.request_id


_ID_PREFIX = uuid.uuid4().hex[:16]  # unique per gateway process; a counter makes each id unique
_id_counter = itertools.count()


def new_request_id(kind: RequestKind) -> str:
    prefix = "chatcmpl" if kind == RequestKind.CHAT else "cmpl"
    return f"{prefix}-{_ID_PREFIX}{next(_id_counter):08x}"


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


def _check_parameters(kind: RequestKind, body: dict) -> None:
    for name in body:
        if name not in ALLOWED[kind]:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise InvalidRequest(f"'{name}' is not supported (only its default value)", param=name)


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
    return stop


def _parse_prompt(body: dict) -> tuple[str | None, list[int] | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return None, prompt
    if prompt is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    raise InvalidRequest("'prompt' must be a string or an array of token ids (one prompt)", param="prompt")


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


def _parse_max_tokens(kind: RequestKind, body: dict) -> int:
    value = _get(body, "max_completion_tokens", int) if kind == RequestKind.CHAT else None
    name = "max_completion_tokens"
    if value is None:
        value, name = _get(body, "max_tokens", int), "max_tokens"
    if value is None:
        return DEFAULT_MAX_TOKENS[kind]
    if value < 1:
        raise InvalidRequest(f"'{name}' must be at least 1", param=name)
    return value


def _parse_sampling(body: dict) -> dict[str, Any]:
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequest("'temperature' must be between 0 and 2", param="temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest("'top_p' must be in (0, 1]", param="top_p")
    top_k = _get(body, "top_k", int, 0)
    if top_k < 0 and top_k != -1:
        raise InvalidRequest("'top_k' must be >= 0 (or -1 for off)", param="top_k")
    return {
        "temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0),
        "seed": _get(body, "seed", int), "ignore_eos": _get(body, "ignore_eos", bool, False),
    }


def _parse_stream(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    options = options or {}
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise InvalidRequest(f"Unrecognized stream option: {sorted(unknown)[0]}", param="stream_options")
    include_usage = _get(options, "include_usage", bool, False)
    return stream, include_usage


def parse_request(kind: RequestKind, body: Any) -> ParsedRequest:
    """Validate an OpenAI request body; raises InvalidRequest naming the bad parameter."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_parameters(kind, body)
    model = _get(body, "model", str)
    if not model:
        raise InvalidRequest("'model' is required", param="model")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise InvalidRequest("only 'n' = 1 is supported", param="n")
    stream, include_usage = _parse_stream(body)
    submit = SubmitRequest(
        request_id=new_request_id(kind), model_id=model, kind=kind,
        max_tokens=_parse_max_tokens(kind, body), stop=_parse_stop(body),
        arrival_s=time.time(), **_parse_sampling(body),
    )
    if kind == RequestKind.CHAT:
        submit.messages = _parse_messages(body)
        submit.num_prompt_chars = sum(len(m["content"]) for m in submit.messages)
    else:
        submit.prompt, submit.prompt_token_ids = _parse_prompt(body)
        submit.num_prompt_chars = len(submit.prompt) if submit.prompt is not None else 4 * len(submit.prompt_token_ids)
    _get(body, "user", str)
    return ParsedRequest(kind=kind, model=model, stream=stream, include_usage=include_usage, submit=submit)


def usage(num_prompt_tokens: int, num_generated_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens, "completion_tokens": num_generated_tokens,
        "total_tokens": num_prompt_tokens + num_generated_tokens,
    }


def full_response(req: ParsedRequest, text: str, finish_reason: str | None, usage_: dict) -> dict:
    """The non-streaming response object."""
    if req.kind == RequestKind.CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": req.request_id, "object": obj, "created": req.created, "model": req.model,
            "choices": [choice], "usage": usage_}


def stream_chunk(req: ParsedRequest, text: str | None, finish_reason: str | None,
                 first: bool = False) -> dict:
    """One SSE chunk with one choice: a text delta and/or the finish reason."""
    if req.kind == RequestKind.CHAT:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    chunk = {"id": req.request_id, "object": obj, "created": req.created, "model": req.model,
             "choices": [choice]}
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(req: ParsedRequest, usage_: dict) -> dict:
    """The extra last chunk of stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if req.kind == RequestKind.CHAT else "text_completion"
    return {"id": req.request_id, "object": obj, "created": req.created, "model": req.model,
            "choices": [], "usage": usage_}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
