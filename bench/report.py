"""Summary statistics, SLO attainment, cold-start overhead, report.md and plots.

The statistics are pure functions of `RequestRecord`s (bench.client), so they are tested
on synthetic records. Definitions (per mode):
- TTFT: request sent -> first content chunk; TPOT: (e2e - TTFT) / (generated - 1),
  requests with >= 2 generated tokens; e2e: sent -> last chunk.
- SLO attainment: the fraction of ALL requests of the trace (failed ones count as
  misses) whose TTFT (resp. TPOT) is within the SLO; `slo_attainment` needs both.
- cold-start overhead: for each cold request, its TTFT minus the median TTFT of warm
  requests of the same prompt-length bucket (powers of two), p50 over cold requests;
  `cold_overhead_local_p50_ms` takes the warm median over requests sent within ±10 s
  only, so a cold start in a quiet moment is not compared with warm ones in a burst.
matplotlib is imported lazily (Agg backend), only when plots are written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from bench.client import ColdStartEvent, RequestRecord

LOCAL_WINDOW_S = 10.0  # cold overhead vs warm requests sent within ±10 s


def percentile(values: Iterable[float], q: float) -> float | None:
    """q-th percentile (0..100), None for no values."""
    array = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(array, q)) if array.size else None


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else round(value_s * 1e3, 3)


def tpot_s(record: RequestRecord) -> float | None:
    """Mean time per output token after the first; None below 2 tokens or on failure."""
    if not record.ok or record.ttft_s is None or record.num_generated_tokens < 2:
        return None
    return (record.e2e_s - record.ttft_s) / (record.num_generated_tokens - 1)


def meets_slo(record: RequestRecord, ttft_slo_s: float, tpot_slo_s: float) -> tuple[bool, bool]:
    """(TTFT met, TPOT met) for one request; a failed request meets neither."""
    if not record.ok or record.ttft_s is None:
        return False, False
    tpot = tpot_s(record)
    return record.ttft_s <= ttft_slo_s, tpot is None or tpot <= tpot_slo_s


def prompt_bucket(num_prompt_tokens: int) -> int:
    """Power-of-two bucket of a prompt length (1, 2, 4, ... tokens)."""
    return 1 << max(0, math.ceil(math.log2(max(1, num_prompt_tokens))))


def cold_overheads_s(records: list[RequestRecord], window_s: float | None = None) -> list[float]:
    """Cold TTFT minus the warm TTFT median of the same prompt bucket, per cold request.

    A cold request whose bucket has no warm request is compared with the nearest bucket
    that has one (by bucket ratio); with no warm request at all the list is empty. With
    `window_s`, the warm reference is taken from requests sent within ±window_s of the
    cold one (same queueing conditions), falling back to the whole run when there are none.
    """
    ok = [r for r in records if r.ok and r.ttft_s is not None]
    warm_by_bucket: dict[int, list[RequestRecord]] = {}
    for r in ok:
        if r.cold_start is False:
            warm_by_bucket.setdefault(prompt_bucket(r.prompt_tokens), []).append(r)
    if not warm_by_bucket:
        return []
    overheads = []
    for r in ok:
        if r.cold_start:
            bucket = prompt_bucket(r.prompt_tokens)
            nearest = min(warm_by_bucket, key=lambda b: abs(math.log2(b) - math.log2(bucket)))
            warm = warm_by_bucket[nearest]
            if window_s is not None:
                warm = [w for w in warm if abs(w.sent_s - r.sent_s) <= window_s] or warm
            overheads.append(r.ttft_s - float(np.median([w.ttft_s for w in warm])))
    return overheads


def attribute_cold_starts(records: list[RequestRecord], events: list[ColdStartEvent],
                          slack_s: float = 0.05) -> int:
    """Mark cold requests from /metrics counter increases when the stream did not say.

    The gateway counts a cold start when the request's first chunk arrives, so for an
    increase of (model, worker) seen between two polls, the cold request is the first
    unmarked request of that model whose first chunk came in that interval (± slack),
    else the latest one before it. Every other request becomes warm. Returns the number
    marked; does nothing (0) when some record already carries the stream's flag.
    """
    if any(r.cold_start is not None for r in records):
        return 0
    ok = [r for r in records if r.ok and r.ttft_s is not None]
    by_model: dict[str, list[RequestRecord]] = {}
    for r in sorted(ok, key=lambda r: r.sent_s + r.ttft_s):
        by_model.setdefault(r.model_id, []).append(r)
    for r in records:
        r.cold_start = False
    marked = 0
    for event in sorted(events, key=lambda e: e.t_s):
        for _ in range(event.count):
            chosen = _cold_candidate(by_model.get(event.model_id, []), event, slack_s)
            if chosen is not None:
                chosen.cold_start, chosen.worker_id = True, event.worker_id or chosen.worker_id
                marked += 1
    return marked


def _cold_candidate(model_records: list[RequestRecord], event: ColdStartEvent, slack_s: float):
    lo, hi = event.prev_t_s - slack_s, event.t_s + slack_s
    before = None
    for r in model_records:
        first_chunk_s = r.sent_s + r.ttft_s
        if r.cold_start:
            continue
        if lo < first_chunk_s <= hi:
            return r
        if first_chunk_s <= lo:
            before = r
    return before


def summarize(records: list[RequestRecord], ttft_slo_s: float, tpot_slo_s: float) -> dict:
    """The per-mode summary (times in ms) of one replay."""
    ok = [r for r in records if r.ok and r.ttft_s is not None]
    ttfts = [r.ttft_s for r in ok]
    tpots = [t for t in (tpot_s(r) for r in ok) if t is not None]
    e2es = [r.e2e_s for r in ok]
    met = [meets_slo(r, ttft_slo_s, tpot_slo_s) for r in records]
    cold = [r for r in ok if r.cold_start]
    span_s = _makespan_s(ok)
    num_tokens = sum(r.num_generated_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_failed": len(records) - len(ok),
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "tpot_p50_ms": _ms(percentile(tpots, 50)),
        "tpot_p99_ms": _ms(percentile(tpots, 99)),
        "e2e_p50_ms": _ms(percentile(e2es, 50)),
        "e2e_p99_ms": _ms(percentile(e2es, 99)),
        "throughput_rps": round(len(ok) / span_s, 3) if span_s else 0.0,
        "output_tokens_per_s": round(num_tokens / span_s, 2) if span_s else 0.0,
        "ttft_slo_attainment": _fraction(m[0] for m in met),
        "tpot_slo_attainment": _fraction(m[1] for m in met),
        "slo_attainment": _fraction(a and b for a, b in met),
        "num_cold_starts": len(cold),
        "cold_start_known": any(r.cold_start is not None for r in records),
        "cold_ttft_p50_ms": _ms(percentile((r.ttft_s for r in cold), 50)),
        "warm_ttft_p50_ms": _ms(percentile((r.ttft_s for r in ok if r.cold_start is False), 50)),
        "cold_overhead_p50_ms": _ms(percentile(cold_overheads_s(records), 50)),
        "cold_overhead_local_p50_ms": _ms(percentile(cold_overheads_s(records, LOCAL_WINDOW_S), 50)),
    }


def slo_over_time(records: list[RequestRecord], ttft_slo_s: float, tpot_slo_s: float,
                  window_s: float) -> tuple[list[float], list[float]]:
    """(window start s, attainment of both SLOs) over windows of request arrival time."""
    if not records:
        return [], []
    end_s = max(r.sent_s for r in records)
    starts, fractions = [], []
    for k in range(int(end_s // window_s) + 1):
        lo, hi = k * window_s, (k + 1) * window_s
        window = [meets_slo(r, ttft_slo_s, tpot_slo_s) for r in records if lo <= r.sent_s < hi]
        if window:
            starts.append(lo)
            fractions.append(sum(a and b for a, b in window) / len(window))
    return starts, fractions


def _fraction(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else None


def _makespan_s(ok: list[RequestRecord]) -> float:
    if not ok:
        return 0.0
    return max(r.sent_s + r.e2e_s for r in ok) - min(r.sent_s for r in ok)


# ---------------------------------------------------------------- files

_TABLE_COLUMNS = [
    ("mode", "mode"), ("num_requests", "requests"), ("num_failed", "failed"),
    ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms"),
    ("e2e_p50_ms", "e2e p50 ms"), ("e2e_p99_ms", "e2e p99 ms"),
    ("throughput_rps", "req/s"), ("output_tokens_per_s", "tok/s"),
    ("ttft_slo_attainment", "TTFT SLO"), ("tpot_slo_attainment", "TPOT SLO"),
    ("slo_attainment", "both SLOs"), ("num_cold_starts", "cold starts"),
    ("cold_ttft_p50_ms", "cold TTFT p50 ms"), ("cold_overhead_p50_ms", "cold overhead p50 ms"),
    ("cold_overhead_local_p50_ms", "cold overhead (±10 s) p50 ms"),
    ("host_store_bytes", "host store MB"), ("private_weight_bytes", "private weights MB"),
    ("private_weight_peak_bytes", "private weights peak MB"),
]


def _cell(key: str, value) -> str:
    if value is None:
        return "n/a"
    if key.endswith("_bytes"):
        return f"{value / 2**20:.1f}"
    if key.endswith("attainment"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def markdown_table(summary: dict) -> str:
    """One row per mode of summary['modes']."""
    header = "| " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(_TABLE_COLUMNS)
    rows = [
        "| " + " | ".join(_cell(key, {"mode": mode, **stats}.get(key)) for key, _ in _TABLE_COLUMNS) + " |"
        for mode, stats in summary["modes"].items()
    ]
    return "\n".join([header, rule, *rows])


def write_outputs(out_dir: Path, summary: dict, records_by_mode: dict[str, list[RequestRecord]],
                  notes: list[str]) -> list[Path]:
    """summary.json, records.jsonl, report.md and the two plots; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "summary.json", out_dir / "records.jsonl", out_dir / "report.md"]
    paths[0].write_text(json.dumps(summary, indent=2) + "\n")
    with paths[1].open("w") as f:
        for mode, records in records_by_mode.items():
            for r in records:
                f.write(json.dumps({"mode": mode, **r.to_dict()}) + "\n")
    paths[2].write_text(_report_markdown(summary, notes))
    paths += _write_plots(out_dir, summary, records_by_mode)
    return paths


def _report_markdown(summary: dict, notes: list[str]) -> str:
    setup = summary["setup"]
    lines = [
        "# c2cserve serverless benchmark", "",
        "Command:", "", "```", summary["command"], "```", "",
        f"SLOs: TTFT {setup['ttft_slo_ms']:.0f} ms, TPOT {setup['tpot_slo_ms']:.0f} ms "
        f"({setup['slo_source']}).", "",
        markdown_table(summary), "",
        "![TTFT CDF](ttft_cdf.png)", "", "![SLO attainment over time](slo_over_time.png)", "",
        "## Setup", "", "```json", json.dumps(setup, indent=2), "```", "",
    ]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def _write_plots(out_dir: Path, summary: dict, records_by_mode: dict[str, list[RequestRecord]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = summary["setup"]
    ttft_slo_s, tpot_slo_s = setup["ttft_slo_ms"] / 1e3, setup["tpot_slo_ms"] / 1e3
    cdf_path, time_path = out_dir / "ttft_cdf.png", out_dir / "slo_over_time.png"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, records in records_by_mode.items():
        ttfts = np.sort([r.ttft_s * 1e3 for r in records if r.ok and r.ttft_s is not None])
        if ttfts.size:
            ax.step(ttfts, np.arange(1, ttfts.size + 1) / len(records), where="post", label=mode)
    ax.axvline(ttft_slo_s * 1e3, color="gray", linestyle="--", label="TTFT SLO")
    ax.set(xscale="log", xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF per mode", ylim=(0, 1.01))
    ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(cdf_path, dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    window_s = setup.get("slo_window_s", 10.0)
    for mode, records in records_by_mode.items():
        starts, fractions = slo_over_time(records, ttft_slo_s, tpot_slo_s, window_s)
        ax.plot(np.asarray(starts) + window_s / 2, np.asarray(fractions) * 100, marker="o", ms=3, label=mode)
    ax.axhline(95, color="gray", linestyle="--", label="95%")
    ax.set(xlabel="time (s, by arrival)", ylabel=f"SLO attainment per {window_s:g} s window (%)",
           title="TTFT and TPOT SLO attainment over time", ylim=(-2, 102))
    ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(time_path, dpi=120), plt.close(fig)
    return [cdf_path, time_path]
