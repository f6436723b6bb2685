"""The one middleware that maps errors to OpenAI's error body and HTTP status.

`services.errors.C2CError` -> its status (`HTTP_STATUS`), `type` (`OPENAI_TYPE`) and a
stable `code`; 503 adds `Retry-After`. aiohttp's own HTTP errors (unknown route, wrong
method with its `Allow` header, body past aiohttp's size limit) and a body aiohttp cannot
decode (corrupt gzip/deflate: `RequestPayloadError` on read) get the same body. A client
that went away (`ConnectionError` on read) gets nothing: it is logged, not answered.
Anything else is a bug: logged with its stack, answered 500 with a one-line message.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

from gateway.openai_api import error_body
from services.errors import OPENAI_TYPE, C2CError, ErrorCode, RateLimited

log = logging.getLogger(__name__)
RETRY_AFTER_S = web.AppKey("retry_after_s", int)

CODE_TEXT = {
    ErrorCode.INVALID_REQUEST: None,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "context_length_exceeded",
    ErrorCode.MODEL_NOT_FOUND: "model_not_found",
    ErrorCode.NO_CAPACITY: "no_capacity",
    ErrorCode.TIMEOUT: "timeout",
    ErrorCode.INTERNAL: "internal_error",
    ErrorCode.ABORTED: "aborted",
    ErrorCode.UNAUTHORIZED: "invalid_api_key",
    ErrorCode.REQUEST_TOO_LARGE: "request_too_large",
    ErrorCode.RATE_LIMITED: "rate_limit_exceeded",
}


def error_payload(exc: C2CError) -> dict:
    code = ErrorCode(exc.code)
    type_ = exc.type_ if isinstance(exc, RateLimited) else OPENAI_TYPE.get(code, "server_error")
    return error_body(str(exc), type_, exc.param, CODE_TEXT.get(code))


def error_response(exc: C2CError, retry_after_s: int = 1) -> web.Response:
    if isinstance(exc, RateLimited):
        retry_after_s = exc.retry_after_s
    headers = {"Retry-After": str(retry_after_s)} if exc.http_status in (429, 503) else None
    return web.json_response(error_payload(exc), status=exc.http_status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except C2CError as exc:
        log.info("%s %s -> %d %s", request.method, request.path, exc.http_status, exc)
        return error_response(exc, request.app.get(RETRY_AFTER_S, 1))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error_response(request, exc)
    except web.RequestPayloadError as exc:
        why = re.sub(r"^\d+, message:\s*", "", str(exc)).strip()  # "400, message:\n  Can not decode ..."
        message = f"We could not read the request body: {why}"
        log.info("%s %s -> 400 %s", request.method, request.path, message)
        response = web.json_response(error_body(message, "invalid_request_error"), status=400)
        response.force_close()  # the rest of the body is unreadable: this connection ends here
        return response
    except ConnectionError as exc:
        log.info("%s %s: the client went away (%s)", request.method, request.path, exc)
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(error_body("internal server error", "server_error", None, "internal_error"), status=500)


def http_error_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's HTTP errors with OpenAI's body; 405 keeps its Allow header."""
    allow = exc.headers.get("Allow")
    messages = {
        404: f"Invalid URL ({request.method} {request.path})",
        405: f"Method {request.method} is not allowed on {request.path} (allowed: {allow})",
        413: f"The request body is too large ({exc.text.rstrip('.')})",
    }
    type_ = "invalid_request_error" if exc.status < 500 else "server_error"
    code = "request_too_large" if exc.status == 413 else None
    body = error_body(messages.get(exc.status, exc.reason), type_, None, code)
    log.info("%s %s -> %d", request.method, request.path, exc.status)
    return web.json_response(body, status=exc.status, headers={"Allow": allow} if allow else None)
