"""The bad-input battery's cases (tests/test_bad_inputs.py runs them): bodies as raw bytes,
so NaN literals, lone surrogates, invalid UTF-8 and 5,000-digit integers reach the gateway
exactly as a hostile client would send them. No tests here: only the table.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MODEL = "bad-inputs-llama"  # a copy of tiny_model("llama") in a folder of this name: its model id
SHORT_MODEL = "bad-inputs-ctx32"  # a catalog alias of it claiming a 32-token context window
CONTEXT_WINDOW = 2048  # the tiny preset's max_position_embeddings
ANY = object()  # a field the case does not check
INVALID = "invalid_request_error"


@dataclass(frozen=True)
class Raw:
    """JSON text put into a body as is (NaN, 1e400, "\\ud800", 5,000 digits)."""

    text: str


@dataclass(frozen=True)
class Case:
    id: str
    path: str = COMPLETIONS
    body: bytes | Callable[[], bytes] = b""  # a callable for the big ones: built when sent
    status: int | None = 400  # None: a vanishing client, no answer expected
    type: str = INVALID
    param: object = ANY
    code: object = ANY
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    send: str = "http"  # http | chunked | slow | headers_only | partial_body | drop_after_body | drop_midstream
    is_greedy: bool = False  # a valid case whose text must equal the greedy answer to body(path)

    def payload(self) -> bytes:
        return self.body() if callable(self.body) else self.body


def body(path: str = COMPLETIONS, model: str = MODEL, **params) -> bytes:
    """A valid small request for `path` with `params` overriding it (None deletes one)."""
    base = {"model": model, "max_tokens": 4, "temperature": 0}
    base |= {"prompt": "hi"} if path == COMPLETIONS else {"messages": [{"role": "user", "content": "hi"}]}
    base |= params
    raws: dict[str, str] = {}

    def placeholder(value):
        if isinstance(value, Raw):
            raws[f"@raw{len(raws)}@"] = value.text
            return f"@raw{len(raws) - 1}@"
        if isinstance(value, dict):
            return {k: placeholder(v) for k, v in value.items()}
        if isinstance(value, list):
            return [placeholder(v) for v in value]
        return value

    text = json.dumps({k: placeholder(v) for k, v in base.items() if v is not None})
    for key, raw in raws.items():
        text = text.replace(f'"{key}"', raw)
    return text.encode()


BIG_INTS = {"2e64": 2**64, "2e70": 2**70, "neg2e70": -(2**70), "50digits": 10**50, "5000digits": Raw("7" * 5000)}
NOT_INTS = {"float": 1.5, "string": "4", "bool": True, "array": [4], "object": {"n": 4}}
NOT_FLOATS = {"nan": Raw("NaN"), "infinity": Raw("Infinity"), "neginfinity": Raw("-Infinity"),
              "1e400": Raw("1e400"), "neg1e400": Raw("-1e400"), "string": "0.5", "bool": True,
              "array": [0.5], "500digits": Raw("9" * 500)}
OUT_OF_RANGE = {"max_tokens": [0, -1, 2**31, CONTEXT_WINDOW + 1], "top_k": [-2, 2**31], "seed": [2**63, -(2**63) - 1],
                "n": [0, 129], "temperature": [-0.1, 2.0001], "top_p": [0, -1, 1.5]}


def _param_cases() -> list[Case]:
    cases = []
    for path, tag in ((COMPLETIONS, "cmpl"), (CHAT, "chat")):
        int_params = ["max_tokens", "top_k", "seed", "n"] + (["max_completion_tokens"] if path == CHAT else [])
        for name in int_params:
            for label, value in (BIG_INTS | NOT_INTS).items():
                cases.append(Case(f"{tag}-{name}-{label}", path, body(path, **{name: value}), param=name))
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            for label, value in NOT_FLOATS.items():
                cases.append(Case(f"{tag}-{name}-{label}", path, body(path, **{name: value}), param=name))
        for name, values in OUT_OF_RANGE.items():
            for value in values:
                cases.append(Case(f"{tag}-{name}-range{value}", path, body(path, **{name: value}), param=name))
    return cases


def _string_cases() -> list[Case]:
    surrogate, low = Raw('"\\ud800"'), Raw('"a\\udfffb"')
    msgs = [{"role": "user", "content": "hi"}]
    return [
        Case("model-surrogate", body=body(model=surrogate), param="model"),
        Case("chat-model-surrogate", CHAT, body(CHAT, model=low), param="model"),
        Case("model-number", body=body(model=7), param="model"),
        Case("model-empty", body=body(model=""), param="model"),
        Case("model-null", body=body(model=Raw("null")), param="model"),
        Case("model-too-long", body=body(model="m" * 300), param="model"),
        Case("model-unknown", body=body(model="no-such-model"), status=404, param="model", code="model_not_found"),
        Case("prompt-surrogate", body=body(prompt=surrogate), param="prompt"),
        Case("prompt-surrogate-in-batch", body=body(prompt=[low]), param="prompt"),
        Case("prompt-empty-string", body=body(prompt="")),  # the engine refuses an empty prompt
        Case("prompt-missing", body=body(prompt=None), param="prompt"),
        Case("prompt-number", body=body(prompt=5), param="prompt"),
        Case("prompt-object", body=body(prompt={"text": "hi"}), param="prompt"),
        Case("prompt-empty-array", body=body(prompt=[]), param="prompt"),
        Case("prompt-batch-mixed", body=body(prompt=["a", [1]]), param="prompt"),
        Case("prompt-negative-token", body=body(prompt=[1, -1]), param="prompt"),
        Case("prompt-token-2e31", body=body(prompt=[2**31]), param="prompt"),
        Case("prompt-token-2e64", body=body(prompt=[2**64]), param="prompt"),
        Case("prompt-token-5000digits", body=body(prompt=[Raw("3" * 5000)]), param="prompt"),
        Case("prompt-token-float", body=body(prompt=[1.5]), param="prompt"),
        Case("prompt-token-bool", body=body(prompt=[True]), param="prompt"),
        Case("prompt-token-past-vocab", body=body(prompt=[100000])),  # the worker knows the vocabulary
        Case("prompt-tokens-fill-window", body=body(prompt=[1] * CONTEXT_WINDOW), param="prompt",
             code="context_length_exceeded"),
        Case("prompt-tokens-plus-max-tokens", body=body(prompt=[1] * 2040, max_tokens=16), param="max_tokens",
             code="context_length_exceeded"),
        Case("short-model-max-tokens", body=body(model=SHORT_MODEL, max_tokens=33), param="max_tokens"),
        Case("short-model-token-prompt", body=body(model=SHORT_MODEL, prompt=[1] * 32), param="prompt",
             code="context_length_exceeded"),
        Case("short-model-text-prompt", body=body(model=SHORT_MODEL, prompt="w " * 20000), param="prompt",
             code="context_length_exceeded"),
        Case("short-model-chat-text", CHAT, body(CHAT, model=SHORT_MODEL, messages=[{"role": "user", "content": "w " * 20000}]),
             param="messages", code="context_length_exceeded"),
        Case("chat-content-surrogate", CHAT, body(CHAT, messages=[{"role": "user", "content": surrogate}]), param="messages"),
        Case("chat-part-surrogate", CHAT, body(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": low}]}]),
             param="messages"),
        Case("chat-role-surrogate", CHAT, body(CHAT, messages=[{"role": surrogate, "content": "hi"}]), param="messages"),
        Case("chat-messages-empty", CHAT, body(CHAT, messages=[]), param="messages"),
        Case("chat-messages-string", CHAT, body(CHAT, messages="hi"), param="messages"),
        Case("chat-messages-missing", CHAT, body(CHAT, messages=None), param="messages"),
        Case("chat-message-number", CHAT, body(CHAT, messages=[1]), param="messages"),
        Case("chat-role-unknown", CHAT, body(CHAT, messages=[{"role": "wizard", "content": "hi"}]), param="messages"),
        Case("chat-role-array", CHAT, body(CHAT, messages=[{"role": ["user"], "content": "hi"}]), param="messages"),
        Case("chat-content-number", CHAT, body(CHAT, messages=[{"role": "user", "content": 5}]), param="messages"),
        Case("chat-content-image", CHAT, body(CHAT, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), param="messages"),
        Case("chat-many-messages", CHAT, body(CHAT, messages=msgs * 20000)),  # the worker counts the tokens
        Case("chat-prompt-param", CHAT, body(CHAT, prompt="hi"), param="prompt"),
        Case("stop-surrogate", body=body(stop=surrogate), param="stop"),
        Case("stop-too-long", body=body(stop="s" * 100_000), param="stop"),
        Case("stop-five", body=body(stop=["a", "b", "c", "d", "e"]), param="stop"),
        Case("stop-empty-string", body=body(stop=[""]), param="stop"),
        Case("stop-number", CHAT, body(CHAT, stop=[1]), param="stop"),
        Case("user-number", body=body(user=5), param="user"),
        Case("user-surrogate", CHAT, body(CHAT, user=surrogate), param="user"),
        Case("key-surrogate", body=body(**{"\ud800": 1})),  # json.dumps writes the key as "\ud800"
        Case("stream-string", body=body(stream="yes"), param="stream"),
        Case("stream-number", CHAT, body(CHAT, stream=1), param="stream"),
        Case("stream-options-without-stream", body=body(stream_options={"include_usage": True}), param="stream_options"),
        Case("stream-options-unknown", CHAT, body(CHAT, stream=True, stream_options={"x": 1}), param="stream_options"),
        Case("stream-options-usage-string", body=body(stream=True, stream_options={"include_usage": "y"}),
             param="include_usage"),
        Case("ignore-eos-string", body=body(ignore_eos="yes"), param="ignore_eos"),
        Case("logit-bias-key", body=body(logit_bias={"x": 5}), param="logit_bias"),
        Case("logit-bias-range", CHAT, body(CHAT, logit_bias={"1": 101}), param="logit_bias"),
        Case("logit-bias-past-vocab", body=body(logit_bias={"100000": 5}), param="logit_bias"),  # the worker knows it
        Case("logprobs-range", body=body(logprobs=21), param="logprobs"),
        Case("chat-top-logprobs-without-logprobs", CHAT, body(CHAT, top_logprobs=2), param="top_logprobs"),
        Case("echo-string", body=body(echo="yes"), param="echo"),
        Case("best-of", body=body(best_of=2), param="best_of"),
        Case("chat-tools", CHAT, body(CHAT, tools=[{"type": "function"}]), param="tools"),
        Case("chat-response-format-xml", CHAT, body(CHAT, response_format={"type": "xml"}), param="response_format"),
        Case("response-format-bad-schema", body=body(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "no-such-type"}}}), param="response_format"),
        Case("min-tokens-past-max-tokens", body=body(min_tokens=5), param="min_tokens"),
    ]


def _deep(depth: int) -> bytes:
    return b'{"model": "%s", "prompt": "hi", "metadata": ' % MODEL.encode() + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


def _body_cases() -> list[Case]:
    valid = body()
    def big_prompt():
        return body(prompt="a" * (1100 << 10))

    return [
        Case("body-empty", body=b""),
        Case("body-whitespace", body=b"  \n "),
        Case("body-null", body=b"null"),
        Case("body-array", body=b"[]"),
        Case("body-number", CHAT, b"42"),
        Case("body-string", body=b'"hi"'),
        Case("body-true", CHAT, b"true"),
        Case("body-truncated", body=valid[:-5]),
        Case("body-trailing-comma", body=valid[:-1] + b",}"),
        Case("body-single-quotes", body=b"{'model': 'llama', 'prompt': 'hi'}"),
        Case("body-two-objects", body=valid + valid),
        Case("body-nan-top-level", body=b"NaN"),
        Case("body-invalid-utf8", body=valid.replace(b'"hi"', b'"h\xff\xfei"')),
        Case("body-overlong-utf8", CHAT, body(CHAT).replace(b'"hi"', b'"\xc0\xaf"')),
        Case("body-utf8-surrogate-bytes", body=valid.replace(b'"hi"', b'"\xed\xa0\x80"')),
        Case("body-deep-array-100k", body=b"[" * 100_000 + b"]" * 100_000),
        Case("body-deep-object-100k", CHAT, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000),
        Case("body-deep-65", body=_deep(65)),
        Case("body-deep-prompt-1000", body=body(prompt=Raw("[" * 1000 + "]" * 1000))),
        Case("body-past-bus-limit", body=big_prompt, status=413, code="request_too_large"),
        Case("body-past-bus-limit-chunked", CHAT, lambda: body(CHAT, messages=[{"role": "user", "content": "a" * (1100 << 10)}]),
             status=413, code="request_too_large", send="chunked"),
        Case("body-past-8mib", body=lambda: body(prompt="a" * (9 << 20)), status=413, code="request_too_large"),
        Case("gzip-past-bus-limit", body=lambda: gzip.compress(big_prompt()), status=413, code="request_too_large",
             headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}),
        Case("gzip-bomb-50mib", body=lambda: gzip.compress(b" " * (50 << 20), 1), status=413, code="request_too_large",
             headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}),
        Case("gzip-corrupt", body=b"this is not gzip", headers={"Content-Encoding": "gzip"}),
        Case("gzip-trailing-junk", body=gzip.compress(valid) + b"junk", headers={"Content-Encoding": "gzip"}),
        Case("deflate-corrupt", CHAT, b"this is not deflate", headers={"Content-Encoding": "deflate"}),
        Case("deflate-flipped", body=_flip(zlib.compress(valid)), headers={"Content-Encoding": "deflate"}),
        Case("form-urlencoded", body=b"model=bad-inputs-llama&prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        Case("multipart", CHAT, b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nbad-inputs-llama\r\n--b--\r\n',
             headers={"Content-Type": "multipart/form-data; boundary=b"}),
        Case("octet-stream-binary", body=bytes(range(256)), headers={"Content-Type": "application/octet-stream"}),
    ]


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def _route_cases() -> list[Case]:
    cases = [Case(f"method-{m.lower()}-{p.strip('/').replace('/', '-')}", p, body(), status=405, method=m)
             for p in (COMPLETIONS, CHAT) for m in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS")]
    cases += [Case("method-post-models", "/v1/models", body(), status=405),
              Case("method-post-health", "/health", b"", status=405),
              Case("method-delete-metrics", "/metrics", b"", status=405, method="DELETE")]
    for path in ("/v1/nothing", "/v1/completion", "/v1/chat/completions/x", "/", "/v1/engines/bad-inputs-llama/completions",
                 "/v1/%ff%fe"):
        cases.append(Case(f"route-{path.strip('/').replace('/', '-') or 'root'}", path, body(), status=404))
    return cases


def _client_cases() -> list[Case]:
    long_run = body(max_tokens=1500, ignore_eos=True, temperature=0)
    return [
        Case("client-headers-then-gone", body=body(), status=None, send="headers_only"),
        Case("client-half-body-then-gone", CHAT, body(CHAT), status=None, send="partial_body"),
        Case("client-gone-before-answer", body=long_run, status=None, send="drop_after_body"),
        Case("client-gone-mid-stream", body=body(max_tokens=1500, ignore_eos=True, stream=True), status=200,
             send="drop_midstream"),
    ]


def _valid_cases() -> list[Case]:
    ok = dict(status=200, type=ANY)
    return [
        Case("valid-temperature-1e-40", body=body(temperature=1e-40), is_greedy=True, **ok),
        Case("valid-top-p-1e-50", CHAT, body(CHAT, temperature=1.0, top_p=1e-50), is_greedy=True, **ok),
        Case("valid-both-tiny", body=body(temperature=1e-40, top_p=1e-50, seed=3), is_greedy=True, **ok),
        Case("valid-max-tokens-1", body=body(max_tokens=1), **ok),
        Case("valid-seed-int64-max", body=body(temperature=0.8, seed=2**63 - 1), **ok),
        Case("valid-seed-int64-min", CHAT, body(CHAT, temperature=0.8, seed=-(2**63)), **ok),
        Case("valid-top-k-off", body=body(temperature=0.9, top_k=-1), **ok),
        Case("valid-top-k-int32-max", CHAT, body(CHAT, temperature=0.9, top_k=2**31 - 1), **ok),
        Case("valid-temperature-2", body=body(temperature=2, top_p=1, seed=1), **ok),
        Case("valid-unicode-prompt", body=body().replace(b'"hi"', '"héllo 世界 🙂 \\u0000 \u2028"'.encode()), **ok),
        Case("valid-unicode-chat", CHAT, body(CHAT, messages=[{"role": "user", "content": "Grüße 👋🏽"}]), **ok),
        Case("valid-escaped-pair", body=body(prompt=Raw('"\\ud83d\\ude00"')), **ok),
        Case("valid-prompt-batch-of-one", body=body(prompt=["hi"]), **ok),
        Case("valid-prompt-token-ids", body=body(prompt=[1, 2, 3]), **ok),
        Case("valid-stop-1024-chars", body=body(stop="s" * 1024), **ok),
        Case("valid-stream-with-usage", CHAT, body(CHAT, stream=True, stream_options={"include_usage": True}), **ok),
        Case("valid-gzip-body", body=gzip.compress(body()), headers={"Content-Encoding": "gzip"}, is_greedy=True, **ok),
        Case("valid-deflate-body", CHAT, zlib.compress(body(CHAT)), headers={"Content-Encoding": "deflate"},
             is_greedy=True, **ok),
        Case("valid-text-plain", body=body(), headers={"Content-Type": "text/plain"}, is_greedy=True, **ok),
        Case("valid-slow-client", CHAT, body(CHAT), send="slow", is_greedy=True, **ok),
        Case("valid-unknown-param-ignored", body=body(bogus=1), is_greedy=True, **ok),
        Case("valid-n-2", body=body(n=2), **ok),
        Case("valid-prompt-batch-of-two", body=body(prompt=["a", "b"]), **ok),
        Case("valid-logprobs-penalties", body=body(logprobs=5, presence_penalty=1, repetition_penalty=1.2), **ok),
        Case("valid-echo", body=body(echo=True, logit_bias={"1": -100}), **ok),
        Case("valid-chat-json-object", CHAT, body(CHAT, response_format={"type": "json_object"}), **ok),
    ]


def all_cases() -> list[Case]:
    """Every case; kinds interleaved so each group of ten mixes them."""
    kinds = [_param_cases(), _string_cases(), _body_cases(), _route_cases(), _client_cases(), _valid_cases()]
    cases = []
    while any(kinds):
        for kind in kinds:
            if kind:
                cases.append(kind.pop(0))
    return cases
