"""The worker's state record, measured live (`services.schemas.WorkerState`).

The engine loop reports each step here (`StateMeter.on_step`: which model, how long,
how many weight bytes the step read) and builds the record about every 50 ms
(`StateMeter.build`) from the engine's counters and the requests in flight. The worker
publishes that record as its telemetry; the placer and the controller take it as the
input of their policies as is.

What a CPU slice measures for the link terms: its "link" is the memory bus to the shared
host store, so `link_gbps` is the weight bytes its steps read per second of step time,
`link_demand_gbps` the bytes it read per second of wall time (its share of the node's
bus), `link_capacity_gbps` the node's read bandwidth (measured once, in the background,
with the roofline probe of `c2c_kernels.membw`), and `link_util` their ratio.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import msgspec

from services.schemas import WorkerState

log = logging.getLogger(__name__)
_EWMA = 0.3  # weight of the newest window in the smoothed rates
PROBE_BYTES = 256 << 20  # bigger than any last-level cache here


@dataclass
class _Window:
    """Steps since the last record."""

    started_s: float = field(default_factory=time.monotonic)
    num_steps: int = 0
    step_s: float = 0.0
    read_bytes: int = 0


class StateMeter:
    def __init__(self, template: WorkerState):
        self.template = template  # the static fields (id, node, link domain, backend, mode, ...)
        self._window = _Window()
        self._model_step_ms: dict[str, float] = {}  # model -> its last step
        self._read_gbps = 0.0  # smoothed bytes per step second
        self._demand_gbps = 0.0  # smoothed bytes per wall second
        self.capacity_gbps = 0.0
        self._probe: threading.Thread | None = None

    def on_step(self, model_id: str | None, step_s: float, read_bytes: int) -> None:
        """One engine step of `model_id` took `step_s` and read `read_bytes` of weights."""
        window = self._window
        window.num_steps += 1
        window.step_s += step_s
        window.read_bytes += read_bytes
        if model_id is not None:
            self._model_step_ms[model_id] = 1000.0 * step_s

    def start_probe(self) -> None:
        """Measure the node's read bandwidth once, in a background thread (the probe's
        kernel is compiled by `up`'s kernel step, or once here on a cold cache)."""
        if self._probe is None:
            self._probe = threading.Thread(target=self._measure_capacity, name="read-probe", daemon=True)
            self._probe.start()

    def _measure_capacity(self) -> None:
        try:
            from c2c_kernels.membw import measure_read_gbps

            self.capacity_gbps = measure_read_gbps(PROBE_BYTES, repeats=3)
            log.info("read bandwidth of this node: %.1f GB/s", self.capacity_gbps)
        except (MemoryError, ImportError, RuntimeError, ValueError) as exc:
            log.warning("could not measure the read bandwidth (link terms stay unknown): %s", exc)

    def build(self, models_with_work: list[str], **live) -> WorkerState:
        """The record: the template, the engine loop's live values and this window's rates."""
        window, now_s = self._window, time.monotonic()
        self._window = _Window()
        wall_s = max(1e-6, now_s - window.started_s)
        if window.step_s > 0:
            self._read_gbps = _smooth(self._read_gbps, window.read_bytes / window.step_s / 1e9)
        self._demand_gbps = _smooth(self._demand_gbps, window.read_bytes / wall_s / 1e9)
        for model_id in [m for m in self._model_step_ms if m not in models_with_work]:
            del self._model_step_ms[model_id]  # idle models are not in the cycle
        capacity = self.capacity_gbps
        return msgspec.structs.replace(
            self.template, **live,
            step_ms=1000.0 * window.step_s / window.num_steps if window.num_steps else 0.0,
            cycle_ms=sum(self._model_step_ms.get(m, 0.0) for m in models_with_work),
            link_gbps=self._read_gbps, link_demand_gbps=self._demand_gbps, link_capacity_gbps=capacity,
            link_util=min(2.0, self._demand_gbps / capacity) if capacity > 0 else 0.0,
        )


def _smooth(old: float, new: float) -> float:
    return new if old == 0 else (1 - _EWMA) * old + _EWMA * new


__all__ = ["PROBE_BYTES", "StateMeter"]
