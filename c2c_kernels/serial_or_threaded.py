"""Serial or threaded: which way a one-token decode GEMV runs, chosen by measured speed.

Why: on a small CPU slice that other processes share, a threaded call waits for its
slowest thread, and a thread whose core is busy elsewhere gets only time slices. On the
2-core VM with one other busy process, a 17 MB bf16 GEMV took 1.1 ms on the calling
thread and 2.1-6.5 ms threaded (static or dynamic chunks alike); on a quiet machine
the threaded call is the faster one. Neither fixed rule fits both, so each size class
(a power of two of the call's work) keeps a moving average of seconds per unit of work
for both ways, runs the faster, and retries the other about every `EXPLORE_EVERY_S`
so a change in the machine's load is noticed within a second or two.

Both ways compute identical results (the same per-row arithmetic), so the choice only
moves time. `C2C_DECODE_THREADS=serial|threaded` (read at import, or set `FORCED`)
pins one way, for A/B measurements and tests.
"""

from __future__ import annotations

import os
import time

EXPLORE_EVERY_S = 0.25
ALPHA = 0.3  # weight of a new sample in the moving average
_SERIAL, _THREADED = 0, 1

FORCED: str | None = os.environ.get("C2C_DECODE_THREADS", "").strip().lower() or None


class SerialOrThreaded:
    """choose(work) -> (key, is_serial); then record(key, is_serial, seconds, work)."""

    def __init__(self) -> None:
        # key -> [serial s/unit, threaded s/unit, serial samples, threaded samples, last explore s]
        self.stats: dict[int, list[float]] = {}

    def choose(self, work: int) -> tuple[int, bool]:
        if FORCED is not None:
            return -1, FORCED == "serial"
        key = work.bit_length()
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = [0.0, 0.0, 0, 0, time.perf_counter()]
        if st[2] < 2 or st[3] < 2:  # a couple of samples of each first (threaded first)
            return key, st[3] > st[2]
        best = _SERIAL if st[0] <= st[1] else _THREADED
        now = time.perf_counter()
        if now - st[4] > EXPLORE_EVERY_S:
            st[4] = now
            best = 1 - best
        return key, best == _SERIAL

    def record(self, key: int, is_serial: bool, seconds: float, work: int) -> None:
        st = self.stats.get(key)
        if st is None:
            return
        way = _SERIAL if is_serial else _THREADED
        rate = seconds / max(1, work)
        st[way] = rate if st[2 + way] == 0 else st[way] + ALPHA * (rate - st[way])
        st[2 + way] += 1

    def summary(self) -> dict[int, str]:
        """Per size class (log2 of work): the faster way so far and both averages."""
        return {key: f"{'serial' if st[0] <= st[1] else 'threaded'} "
                     f"(serial {st[0] * 1e9:.3f} ns/unit x{int(st[2])}, threaded {st[1] * 1e9:.3f} x{int(st[3])})"
                for key, st in sorted(self.stats.items())}
