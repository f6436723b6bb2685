"""Controller policy: per-worker feedback law on the runtime knobs (pure module).

Every telemetry sample (100 ms - 1 s apart) of one worker goes through
`WorkerController.update`, which returns new knobs or None. The law is built to be
stable under a contention spike on the shared link:

- measurements are smoothed (EWMA, `alpha`), so one noisy sample moves nothing much;
- a dead band (hysteresis): nothing changes while TPOT sits in
  [`low_band` * SLO, SLO] and TTFT is within its SLO;
- the correction is multiplicative and damped: chunk *= (SLO / TPOT) ** gain with
  gain < 1, clamped to [1 / max_step, max_step] per update (rate limit), and updates
  come at most every `min_interval_s`;
- knobs only move inside their [min, max] bounds.

Why chunk size is the main knob: a prefill chunk runs inside the same step as the decode
tokens of the batch, so a bigger chunk lengthens every decode step (TPOT up) and shortens
prefill (TTFT down). Under link contention each step streams host weights more slowly, so
the same chunk costs more TPOT and the law shrinks it. When even the minimum chunk misses
TPOT, the batch cap shrinks (fewer sequences per step); it grows back when there is TPOT
headroom and a queue. The rho cap follows KV pressure (cached tiles yield HBM to KV) and
the decode threshold follows the batch cap (decode batches stay on the GEMV path).

Link-bound steps (achieved link GB/s near what the link gives the worker, when telemetry
says so): the weights cross the link once per step whatever the chunk or the batch, so
shrinking either would only slow prefill; the law holds them (or grows the chunk when
TTFT is late) and leaves contention to the placer, which routes away from busy links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from services.knobs import Knobs
from services.schemas import WorkerState
from services.slo import DEFAULT_TPOT_SLO_MS, DEFAULT_TTFT_SLO_MS


@dataclass
class SLO:
    ttft_ms: float = DEFAULT_TTFT_SLO_MS
    tpot_ms: float = DEFAULT_TPOT_SLO_MS


@dataclass(frozen=True)
class Limits:
    """Bounds and gains of the law."""

    min_chunk: int = 32
    max_chunk: int = 2048
    min_seqs: int = 2
    max_seqs: int = 256
    gain: float = 0.5  # fraction of the log-error corrected per update
    max_step: float = 2.0  # at most x2 or /2 per update
    low_band: float = 0.7  # dead band: TPOT in [low_band, 1] * SLO is left alone
    alpha: float = 0.5  # EWMA weight of the newest sample
    min_interval_s: float = 0.2
    kv_low: float = 0.10  # KV free below this: cached tiles yield (rho cap down)
    kv_high: float = 0.30  # KV free above this: rho cap may grow back
    rho_step: float = 0.1
    link_bound_frac: float = 0.8  # achieved / available link rate above this: link-bound


class WorkerController:  # per worker state of the feedback law
    def __init__(self, slo: SLO, knobs: Knobs = Knobs(), limits: Limits = Limits()):
        self.slo = self.default_slo = slo
        self.knobs = replace(knobs)
        self.limits = limits
        self._tpot_ms: float | None = None
        self._ttft_ms: float | None = None
        self._last_change_s = -math.inf

    def update(self, sample: WorkerState) -> Knobs | None:  # new knobs, or None if unchanged
        """Fold one sample of the worker's state in; returns the new knobs when any knob
        changed. The targets are the tightest SLOs among the worker's requests when it
        reports them (`services/slo.py`), else the controller's defaults."""
        self._observe(sample)
        self.slo = SLO(sample.ttft_slo_ms or self.default_slo.ttft_ms, sample.tpot_slo_ms or self.default_slo.tpot_ms)
        if sample.t_s - self._last_change_s < self.limits.min_interval_s:
            return None
        new = self._decide(sample)
        if new == self.knobs:
            return None
        self.knobs = new
        self._last_change_s = sample.t_s
        return replace(new)

    def _observe(self, sample: WorkerState) -> None:
        self._tpot_ms = _ewma(self._tpot_ms, sample.tpot_p50_ms, self.limits.alpha)
        self._ttft_ms = _ewma(self._ttft_ms, sample.ttft_p50_ms, self.limits.alpha)

    def _decide(self, sample: WorkerState) -> Knobs:
        factor = self._chunk_factor(sample)
        chunk = _clamp_int(self.knobs.chunk_size * factor, self.limits.min_chunk, self.limits.max_chunk)
        seqs = self._batch_cap(sample, chunk, factor)
        moved = chunk != self.knobs.chunk_size or seqs != self.knobs.max_num_seqs
        return Knobs(
            chunk_size=chunk,
            max_num_seqs=seqs,
            # token budget of a step: one prefill chunk plus one token per decoding sequence
            max_num_batched_tokens=chunk + seqs if moved else self.knobs.max_num_batched_tokens,
            decode_threshold=max(1, min(seqs, 64)) if moved else self.knobs.decode_threshold,
            rho_cap=self._rho_cap(sample),
        )

    def _chunk_factor(self, sample: WorkerState) -> float:
        """Multiplicative change of the chunk size (1.0 inside the dead band)."""
        lim, tpot, ttft = self.limits, self._tpot_ms, self._ttft_ms
        if sample.oldest_wait_ms is not None:  # a long prefill in flight is late before it ends
            ttft = max(ttft or 0.0, sample.oldest_wait_ms)
        ttft_late = ttft is not None and ttft > self.slo.ttft_ms and sample.num_waiting > 0
        if tpot is not None and tpot > self.slo.tpot_ms and self.is_link_bound(sample):
            # steps wait on host bytes, which cross once per step whatever the chunk: a
            # smaller chunk would only slow prefill. Grow it if prefill is late, else hold.
            if not ttft_late:
                return 1.0
            ratio = ttft / self.slo.ttft_ms
        elif tpot is not None and tpot > self.slo.tpot_ms:
            ratio = self.slo.tpot_ms / tpot  # < 1: shrink
        elif ttft_late:
            # prefill is late; grow only while TPOT has headroom
            headroom = self.slo.tpot_ms / tpot if tpot else lim.max_step
            ratio = min(headroom, ttft / self.slo.ttft_ms)
            if ratio <= 1.0:
                return 1.0
        elif tpot is not None and tpot < lim.low_band * self.slo.tpot_ms and sample.num_waiting > 0:
            ratio = lim.low_band * self.slo.tpot_ms / tpot  # > 1: grow toward the band
        else:
            return 1.0
        factor = ratio**lim.gain
        return min(lim.max_step, max(1.0 / lim.max_step, factor))

    def is_link_bound(self, sample: WorkerState) -> bool:
        """Achieved link rate near what the link domain gives this worker."""
        cap = sample.link_capacity_gbps
        return cap > 0 and sample.link_gbps >= self.limits.link_bound_frac * cap

    def _batch_cap(self, sample: WorkerState, chunk: int, factor: float) -> int:
        """Shrink the batch cap when the minimum chunk still misses TPOT; regrow with a queue."""
        lim, seqs = self.limits, self.knobs.max_num_seqs
        if self.is_link_bound(sample):
            return seqs  # fewer sequences would not make a link-bound step shorter
        if factor < 1.0 and chunk <= lim.min_chunk and self.knobs.chunk_size <= lim.min_chunk:
            return _clamp_int(seqs * factor, lim.min_seqs, lim.max_seqs)
        if factor > 1.0 and sample.num_waiting > 0 and sample.num_running >= seqs:
            return _clamp_int(seqs + max(1, seqs // 8), lim.min_seqs, lim.max_seqs)  # additive
        return seqs

    def _rho_cap(self, sample: WorkerState) -> float:
        """Cached tiles yield HBM to the KV cache when it runs short (hysteresis band)."""
        lim, rho = self.limits, self.knobs.rho_cap
        if sample.kv_free_frac < lim.kv_low:
            return round(max(0.0, rho - lim.rho_step), 6)
        if sample.kv_free_frac > lim.kv_high and rho < 1.0:
            return round(min(1.0, rho + lim.rho_step / 2), 6)
        return rho


def _ewma(prev: float | None, value: float | None, alpha: float) -> float | None:
    if value is None:
        return prev
    return value if prev is None else alpha * value + (1.0 - alpha) * prev


def _clamp_int(value: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(value))))


__all__ = ["WorkerState", "Knobs", "Limits", "SLO", "WorkerController"]
