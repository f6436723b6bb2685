"""The one middleware that maps errors to OpenAI's error body and HTTP status.

`services.errors.C2CError` -> its status (`HTTP_STATUS`), `type` (`OPENAI_TYPE`) and a
stable `code`; 503 adds `Retry-After`. aiohttp's own HTTP errors (unknown route, wrong
method) get the same body. Anything else is a bug: logged with its stack, answered 500
with a one-line message.
"""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.openai_api import error_body
from services.errors import OPENAI_TYPE, C2CError, ErrorCode

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
}


def error_payload(exc: C2CError) -> dict:
    code = ErrorCode(exc.code)
    return error_body(str(exc), OPENAI_TYPE.get(code, "server_error"), exc.param, CODE_TEXT.get(code))


def error_response(exc: C2CError, retry_after_s: int = 1) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if exc.http_status == 503 else None
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
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        return web.json_response(error_body(exc.reason, type_), status=exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(error_body("internal server error", "server_error", None, "internal_error"), status=500)
