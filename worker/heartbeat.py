"""The worker's heartbeat: a thread of its own with its own Redis connection.

The placer judges a worker alive by its heartbeat key `c2c:worker:<id>` (a hash with a
TTL). Written from the asyncio loop, it stopped whenever the loop waited: a long
tokenization, a JIT compile or a busy engine thread could make a live worker look dead,
and its requests were re-dispatched under it. This thread does nothing but write the key,
so only a dead or paused (SIGSTOP) process lets it expire. How the engine itself is doing
travels in the same hash (`stalled_s`) and in telemetry; the placer stops routing to a
worker whose engine has had work without finishing a step for too long.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class Heartbeat:
    """Every `period_s`: HSET key row() + EXPIRE key ttl_s, until stop()."""

    def __init__(self, redis_url: str, key: str, row: Callable[[], dict[str, str]],
                 period_s: float, ttl_s: int):
        self.key = key
        self.row = row
        self.period_s = period_s
        self.ttl_s = ttl_s
        self._client = redis.Redis.from_url(redis_url, socket_timeout=max(0.5, period_s),
                                            socket_connect_timeout=max(0.5, period_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {key}", daemon=True)
        self._is_failing = False

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        """One write; a Redis error is logged once per outage, never raised."""
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(self.key, mapping=self.row())
                pipe.expire(self.key, self.ttl_s)
                pipe.execute()
        except (RedisError, OSError) as exc:
            if not self._is_failing:
                log.warning("heartbeat to Redis failed (retrying every %.1f s): %s", self.period_s, exc)
            self._is_failing = True
            return
        if self._is_failing:
            log.info("heartbeat to Redis restored")
        self._is_failing = False

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.beat()

    def stop(self, delete: bool = True) -> None:
        """Stop beating; delete the key so placers forget this worker at once."""
        self._stop.set()
        self._thread.join(timeout=2 * self.period_s + 1)
        if delete:
            try:
                self._client.delete(self.key)
            except (RedisError, OSError) as exc:
                log.debug("could not delete %s: %s", self.key, exc)
        self._client.close()
