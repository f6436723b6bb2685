"""Logging helpers: the request id on every line about a request."""

from __future__ import annotations

import logging
import re
from typing import Any


class RequestLog(logging.LoggerAdapter):
    """`RequestLog(log, request_id).info("...")` -> "[req=<id>] ..." on every line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[req={self.extra['request_id']}] {msg}", kwargs


def redact(url: str) -> str:
    """A URL (or comma-separated URLs) with passwords replaced by ***, for logs and errors."""
    return re.sub(r"//[^@/,]*@", "//***@", url)


def request_log(logger: logging.Logger, request_id: str) -> RequestLog:
    return RequestLog(logger, {"request_id": request_id})


def setup_logging(level: str = "INFO") -> None:
    """Used by services started directly (not through the CLI, which configures logging)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=getattr(logging, level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
