"""NATS and Redis helpers: connect with retry, typed decoding at the edge, clean shutdown.

`subscribe_typed` decodes every payload with the one decoder of its subject's type and
calls the handler with the decoded message; a payload that does not decode is logged
and dropped (it never kills the subscription). Handlers of one subscription run one at
a time, so a handler must hand long work to a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from redis.exceptions import RedisError

from services import keys, schemas
from services.errors import C2CError
from services.logutil import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_RESPONDERS_STATUS = "503"

# what a Redis or NATS call may raise when the server is away (services log it and go on)
IO_ERRORS: tuple[type[BaseException], ...] = (OSError, RedisError, nats.errors.Error)


async def connect_nats(url: str, name: str, timeout_s: float = 20.0,
                       on_reconnected: Callable[[], Awaitable[None]] | None = None,
                       on_disconnected: Callable[[], Awaitable[None]] | None = None) -> NATS:
    """Connect, retrying until `timeout_s`; raises C2CError naming the URL (password
    redacted) if it never answers or refuses the credentials.

    `url` may list several servers of one NATS cluster, comma-separated: the client picks
    one and fails over to the others (and to those the cluster gossips) when it dies.
    Credentials in the first URL serve every server, gossiped ones included."""
    servers, user, password = _servers_and_credentials(url)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    holder: list[NATS] = []

    async def disconnected() -> None:
        if holder and not (holder[0].is_closed or holder[0].is_draining):
            log.warning("NATS connection lost; reconnecting to %s", redact(url))
            if on_disconnected is not None:
                await on_disconnected()

    while time.monotonic() < deadline:
        try:  # a refused password makes nats-py retry forever: the deadline bounds it
            nc = await asyncio.wait_for(nats.connect(
                servers=servers, user=user, password=password, name=name, connect_timeout=2,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True,
                error_cb=_log_error, disconnected_cb=disconnected, reconnected_cb=on_reconnected,
            ), timeout=max(0.1, deadline - time.monotonic()))
            holder.append(nc)
            return nc
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            last = last if isinstance(exc, TimeoutError) and last else exc
            await asyncio.sleep(0.3)
    raise C2CError(f"cannot connect to NATS at {redact(url)} within {timeout_s:.0f} s: {last!r}")


def _servers_and_credentials(url: str) -> tuple[list[str], str | None, str | None]:
    """Server URLs without credentials, and the user/password of the first that has them."""
    servers, user, password = [], None, None
    for item in (u.strip() for u in url.split(",") if u.strip()):
        parts = urllib.parse.urlsplit(item)
        if parts.username is not None and user is None:
            user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
        servers.append(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl())
    return servers, user, password


async def _log_error(exc: Exception) -> None:
    log.warning("NATS error: %s", exc)


async def connect_redis(url: str, timeout_s: float = 20.0):
    """A redis.asyncio client that answered PING; raises C2CError if it never does."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, decode_responses=True, socket_connect_timeout=2)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.ping()
            return client
        except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise C2CError(f"cannot connect to Redis at {redact(url)} within {timeout_s:.0f} s: {exc}") from exc
            await asyncio.sleep(0.3)


async def keys_exist(redis, names: list[str]) -> list[bool]:
    """Whether each key exists, in one pipelined round trip (raises IO_ERRORS)."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(name)
        return [bool(found) for found in await pipe.execute()]


async def live_workers(redis) -> list[schemas.WorkerInfo]:
    """The heartbeat records of the workers alive now (`c2c:worker:<id>`; raises IO_ERRORS)."""
    infos = []
    async for key in redis.scan_iter(match=keys.WORKER_PATTERN, count=500):
        row = await redis.hgetall(key)
        if not row:
            continue
        row["pinned_models"] = [m for m in row.get("pinned_models", "").split(",") if m]
        infos.append(msgspec.convert(row, schemas.WorkerInfo, strict=False))
    return infos


async def beat(redis, key: str, ttl_s: int, what: str) -> None:
    """A liveness key (value "1", TTL); a Redis error is logged, never raised."""
    try:
        await redis.set(key, "1", ex=ttl_s)
    except IO_ERRORS as exc:
        log.warning("%s heartbeat failed: %s", what, exc)


def is_no_responders(msg: Msg) -> bool:
    """True for the server's status message sent when a request had no subscriber."""
    return not msg.data and bool(msg.headers) and msg.headers.get("Status") == NO_RESPONDERS_STATUS


async def subscribe_typed(
    nc: NATS, subject: str, message_type: type[T],
    handler: Callable[[T, Msg], Awaitable[None] | None], queue: str = "",
):
    """Subscribe `subject`; decode each payload as `message_type`; call handler(message, msg)."""
    dec = schemas.decoder(message_type)

    async def on_msg(msg: Msg) -> None:
        try:
            message = dec.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("dropped a malformed %s on %s: %s", message_type.__name__, msg.subject, exc)
            return
        result = handler(message, msg)
        if asyncio.iscoroutine(result):
            await result

    return await nc.subscribe(subject, queue=queue, cb=on_msg)


async def close_nats(nc: NATS | None) -> None:
    """Drain (deliver what is pending, then close); never raises on shutdown."""
    if nc is None or nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), timeout=5)
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        log.debug("drain failed (%s); closing", exc)
        with contextlib.suppress(Exception):
            await nc.close()


async def shutdown(tasks: set[asyncio.Task], nc: NATS | None, redis: Any | None) -> None:
    """A service's teardown: cancel its background tasks, drain NATS, close Redis."""
    for task in list(tasks):
        task.cancel()
    await close_nats(nc)
    if redis is not None:
        with contextlib.suppress(Exception):
            await redis.aclose()


def spawn(coro: Awaitable[Any], tasks: set[asyncio.Task], what: str) -> asyncio.Task:
    """A background task that is kept alive and whose failure is logged, not lost."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)

    def done(t: asyncio.Task) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.warning("%s failed: %r", what, t.exception())

    task.add_done_callback(done)
    return task


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (less per-message overhead), else asyncio's.

    C2C_UVLOOP=0 forces the standard loop.
    """
    if os.environ.get("C2C_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Awaitable[Any]) -> Any:
    """asyncio.run(main) on `new_event_loop()`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def serve_until_signal(service: Any) -> None:
    """Start `service`, run until SIGINT/SIGTERM, then stop it (also after a failed start).

    A signal during a slow start (a worker compiling kernels) stops it at once instead
    of after the start finished."""
    stop = stop_event_on_signals()
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here
            await stopping
        else:
            log.info("stop signal while starting: stopping now")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, *IO_ERRORS):
                await starting
    finally:
        stopping.cancel()
        await service.stop()


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a daemon thread. Unlike asyncio.to_thread, a process that stops
    while it runs (a long compile) does not wait for it at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(result)

    def target() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as error:  # handed to the awaiting coroutine
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=target, name=getattr(fn, "__name__", "work"), daemon=True).start()
    return await future


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT/SIGTERM (the service's main loop waits on it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop
