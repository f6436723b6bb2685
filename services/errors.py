"""Named errors shared by every service.

A `C2CError` carries a stable `code` (the OpenAI-style error `type`/`code` on the wire)
and an HTTP status the gateway maps it to. Raise these for anything a user can cause;
let real bugs surface as ordinary exceptions.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes on the wire (IntEnum, per STYLE: enums travel as ints)."""

    NONE = 0
    INVALID_REQUEST = 1  # 400: wrong types, unknown parameters, bad values
    CONTEXT_LENGTH_EXCEEDED = 2  # 400: prompt (+ max_tokens) past the context window
    MODEL_NOT_FOUND = 3  # 404
    NO_CAPACITY = 4  # 503 + Retry-After: no worker can take it now
    TIMEOUT = 5  # 504
    INTERNAL = 6  # 500: the engine failed on this request
    ABORTED = 7  # the client went away / request cancelled
    UNAUTHORIZED = 8  # 401
    REQUEST_TOO_LARGE = 9  # 413: more than one message on the bus can carry
    RATE_LIMITED = 10  # 429 + Retry-After: over a tenant's limit


HTTP_STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.NO_CAPACITY: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
    ErrorCode.ABORTED: 499,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.REQUEST_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
}

OPENAI_TYPE = {
    ErrorCode.INVALID_REQUEST: "invalid_request_error",
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorCode.MODEL_NOT_FOUND: "invalid_request_error",
    ErrorCode.NO_CAPACITY: "server_error",
    ErrorCode.TIMEOUT: "server_error",
    ErrorCode.INTERNAL: "server_error",
    ErrorCode.ABORTED: "server_error",
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.REQUEST_TOO_LARGE: "invalid_request_error",
    ErrorCode.RATE_LIMITED: "requests",  # OpenAI's 429: "requests" or "tokens" (RateLimited.type_)
}


class C2CError(Exception):
    """An error a user can cause or must be told about; never a stack trace."""

    code: ErrorCode = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, code: ErrorCode | None = None, param: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.param = param

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


class InvalidRequest(C2CError):
    code = ErrorCode.INVALID_REQUEST


class ContextLengthExceeded(C2CError):
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED


class ModelNotFound(C2CError):
    code = ErrorCode.MODEL_NOT_FOUND


class NoCapacity(C2CError):
    code = ErrorCode.NO_CAPACITY


class RequestTooLarge(C2CError):
    code = ErrorCode.REQUEST_TOO_LARGE


class RateLimited(C2CError):
    """Over a tenant's limit: 429 with Retry-After; OpenAI's `type` names the limit's kind."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, retry_after_s: int, type_: str = "requests"):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.type_ = type_


class CheckpointError(C2CError):
    """A checkpoint folder is unusable; the message names the file and the problem."""

    code = ErrorCode.INVALID_REQUEST
