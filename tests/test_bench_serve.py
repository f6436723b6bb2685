"""bench serve: summary statistics on synthetic records, and one short end-to-end run."""

from __future__ import annotations

import json

import pytest

from bench.client import RequestRecord
from bench.report import (
    cold_overheads_s,
    markdown_table,
    meets_slo,
    prompt_bucket,
    slo_over_time,
    summarize,
    tpot_s,
)


def _record(i, ttft_s, e2e_s, tokens=11, prompt=100, cold=False, ok=True, sent_s=None):
    return RequestRecord(
        index=i, model_id=f"m{i % 3}", scheduled_s=float(i), sent_s=float(i) if sent_s is None else sent_s,
        prompt_tokens=prompt, max_tokens=tokens, ok=ok, http_status=200 if ok else 503,
        ttft_s=ttft_s if ok else None, e2e_s=e2e_s, num_generated_tokens=tokens if ok else 0, cold_start=cold,
    )


def test_tpot_is_decode_time_per_token_after_the_first():
    r = _record(0, ttft_s=0.1, e2e_s=1.1, tokens=11)
    assert tpot_s(r) == pytest.approx(0.1)
    assert tpot_s(_record(1, 0.1, 0.1, tokens=1)) is None
    assert tpot_s(_record(2, 0.1, 0.5, ok=False)) is None


def test_slo_attainment_counts_failures_as_misses():
    records = [
        _record(0, 0.05, 0.55),  # TTFT ok, TPOT 50 ms ok
        _record(1, 0.30, 0.80),  # TTFT miss
        _record(2, 0.05, 2.05),  # TPOT 200 ms miss
        _record(3, 0.05, 0.05, ok=False),  # failed: misses both
    ]
    assert meets_slo(records[0], 0.1, 0.1) == (True, True)
    assert meets_slo(records[2], 0.1, 0.1) == (True, False)
    s = summarize(records, ttft_slo_s=0.1, tpot_slo_s=0.1)
    assert s["ttft_slo_attainment"] == 0.5
    assert s["tpot_slo_attainment"] == 0.5
    assert s["slo_attainment"] == 0.25
    assert (s["num_requests"], s["num_ok"], s["num_failed"]) == (4, 3, 1)


def test_percentiles_and_throughput():
    records = [_record(i, ttft_s=0.01 * (i + 1), e2e_s=1.0, sent_s=float(i)) for i in range(100)]
    s = summarize(records, 1.0, 1.0)
    assert s["ttft_p50_ms"] == pytest.approx(505.0)
    assert s["ttft_p99_ms"] == pytest.approx(990.1)
    assert s["e2e_p50_ms"] == pytest.approx(1000.0)
    # 100 requests from t=0 to the last one ending at 99 + 1 s
    assert s["throughput_rps"] == pytest.approx(1.0)
    assert s["output_tokens_per_s"] == pytest.approx(11.0)


def test_cold_overhead_compares_with_warm_requests_of_the_same_prompt_bucket():
    warm = [_record(i, 0.010, 0.5, prompt=30) for i in range(5)]
    warm += [_record(10 + i, 0.100, 0.5, prompt=500) for i in range(5)]
    cold = [
        _record(20, 0.015, 0.5, prompt=31, cold=True),  # bucket 32: +5 ms
        _record(21, 0.300, 0.5, prompt=400, cold=True),  # bucket 512: +200 ms
        _record(22, 0.050, 0.5, prompt=2000, cold=True),  # no warm 2048: nearest is 512 -> -50 ms
    ]
    assert prompt_bucket(31) == 32 and prompt_bucket(400) == 512 and prompt_bucket(1) == 1
    overheads = cold_overheads_s(warm + cold)
    assert overheads == pytest.approx([0.005, 0.200, -0.050])
    s = summarize(warm + cold, 1.0, 1.0)
    assert s["num_cold_starts"] == 3
    assert s["cold_overhead_p50_ms"] == pytest.approx(5.0)
    assert s["cold_ttft_p50_ms"] == pytest.approx(50.0)
    assert s["cold_start_known"] is True


def test_local_cold_overhead_uses_warm_requests_sent_nearby():
    quiet = [_record(i, 0.010, 0.5, sent_s=float(i)) for i in range(5)]  # t = 0..4 s: 10 ms
    burst = [_record(10 + i, 1.000, 2.0, sent_s=100.0 + i) for i in range(9)]  # t = 100..108 s: 1 s
    cold = _record(30, 1.050, 2.0, sent_s=104.0, cold=True)
    records = quiet + burst + [cold]
    assert cold_overheads_s(records) == pytest.approx([1.050 - 1.000])  # median of all 14 warm is 1 s
    assert cold_overheads_s(quiet + [cold], window_s=10.0) == pytest.approx([1.040])  # no neighbour: all
    early_cold = _record(31, 0.030, 0.5, sent_s=2.0, cold=True)
    assert cold_overheads_s(records + [early_cold], window_s=10.0)[-1] == pytest.approx(0.020)
    assert cold_overheads_s(records + [early_cold])[-1] == pytest.approx(0.030 - 1.000)


def test_unknown_cold_starts_give_no_overhead():
    records = [_record(i, 0.01, 0.5, cold=None) for i in range(4)]
    s = summarize(records, 1.0, 1.0)
    assert s["cold_start_known"] is False
    assert s["cold_overhead_p50_ms"] is None and s["num_cold_starts"] == 0


def test_slo_over_time_windows_by_send_time():
    records = [_record(i, 0.01, 0.02, sent_s=i * 0.5) for i in range(20)]  # 0 .. 9.5 s
    records += [_record(100 + i, 2.0, 2.5, sent_s=10 + i * 0.5) for i in range(20)]  # 10 .. 19.5 s
    starts, fractions = slo_over_time(records, 0.1, 0.1, window_s=5.0)
    assert starts == [0.0, 5.0, 10.0, 15.0]
    assert fractions == [1.0, 1.0, 0.0, 0.0]


def test_markdown_table_has_one_row_per_mode():
    s = summarize([_record(0, 0.01, 0.1)], 1.0, 1.0)
    table = markdown_table({"modes": {"host": {**s, "host_store_bytes": 3 << 20}, "load": s}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| host |") and "| 3.0 |" in lines[2]
    assert "100.0%" in lines[2]


def test_write_outputs_writes_json_markdown_and_plots(tmp_path):
    from bench.report import write_outputs

    records = {"host": [_record(i, 0.01, 0.2) for i in range(5)], "load": [_record(i, 0.2, 0.5, cold=True) for i in range(5)]}
    setup = {"ttft_slo_ms": 100.0, "tpot_slo_ms": 50.0, "slo_source": "flags", "slo_window_s": 2.0}
    summary = {"command": "c2cserve bench serve --test", "setup": setup,
               "modes": {m: summarize(r, 0.1, 0.05) for m, r in records.items()}}
    paths = write_outputs(tmp_path, summary, records, notes=["a note"])
    assert {p.name for p in paths} == {"summary.json", "records.jsonl", "report.md", "ttft_cdf.png", "slo_over_time.png"}
    assert json.loads((tmp_path / "summary.json").read_text())["modes"]["host"]["ttft_slo_attainment"] == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "c2cserve bench serve --test" in report and "a note" in report
    assert (tmp_path / "ttft_cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 10


def test_pin_models_balances_request_counts_and_covers_every_worker():
    from bench.serve import pin_models

    counts = [5, 40, 10, 30, 2, 8, 3, 2]  # m1 and m3 are the hot ones
    pinned = pin_models([f"m{i}" for i in range(8)], 2, counts)
    assert sorted(sum(pinned.values(), [])) == [f"m{i}" for i in range(8)]
    assert "m1" in pinned[0] and "m3" in pinned[1]  # the two hot models on different workers
    loads = [sum(counts[int(m[1:])] for m in models) for models in pinned.values()]
    assert abs(loads[0] - loads[1]) <= 2
    assert pin_models(["a", "b"], 3, [1, 9]) == {0: ["b"], 1: ["a"], 2: ["b"]}


def test_cold_starts_are_attributed_from_metrics_increases():
    from bench.client import ColdStartEvent, parse_cold_start_lines
    from bench.report import attribute_cold_starts

    text = (
        "# TYPE c2c_cold_starts_total counter\n"
        'c2c_cold_starts_total{model="a",worker="w0"} 2.0\n'
        'c2c_cold_starts_created{model="a",worker="w0"} 1.7e9\n'
        'c2c_cold_starts_total{model="b",worker="w1"} 1.0\n'
    )
    assert parse_cold_start_lines(text) == {("a", "w0"): 2.0, ("b", "w1"): 1.0}
    records = [_record(i, 0.1, 0.5, cold=None, sent_s=float(i)) for i in range(6)]  # models m0 m1 m2 m0 m1 m2
    events = [ColdStartEvent(1.25, 0.75, "m1", "w1", 1), ColdStartEvent(3.5, 3.0, "m0", "w0", 1)]
    assert attribute_cold_starts(records, events) == 2
    assert [r.cold_start for r in records] == [False, True, False, True, False, False]
    assert records[1].worker_id == "w1"
    # a stream that carries the flag wins: nothing is re-attributed
    assert attribute_cold_starts(records, events) == 0


def test_private_bytes_are_replayed_from_worker_logs():
    from bench.client import private_bytes_from_logs

    w0 = ("x INFO worker.runner: model a loaded (100 bytes) in 0.1 s\n"
          "x INFO worker.runner: model b loaded (50 bytes) in 0.1 s\n"
          "x INFO worker.runner: evicting model a (100 bytes) to load c\n"
          "x INFO worker.runner: model c loaded (70 bytes) in 0.1 s\n")
    w1 = "x INFO worker.runner: model a mapped in 0.001 s\n"
    got = private_bytes_from_logs([w0, w1])
    assert got["private_weight_bytes"] == 120 and got["private_weight_peak_bytes"] == 150


def _write_tiny_catalog(root):
    from worker.synth import synth_model

    for name, arch, seed in (("smoke-llama", "llama", 1), ("smoke-qwen2", "qwen2", 2)):
        synth_model(arch, "tiny", root / name, seed=seed)
    return root


def test_bench_serve_end_to_end_smoke(tmp_path):
    """Two modes, one worker, tiny models, ~5 s of traffic each: real cluster, real client."""
    from services.cli import main

    catalog = _write_tiny_catalog(tmp_path / "catalog")
    out = tmp_path / "out"
    argv = ["bench", "serve", "--modes", "host,load", "--duration", "5", "--workers", "1",
            "--catalog", str(catalog), "--rate", "1.5", "--on-off", "none", "--ttft-slo-ms", "5000",
            "--tpot-slo-ms", "2000", "--max-prompt-tokens", "32", "--max-output-tokens", "4",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    host, load = summary["modes"]["host"], summary["modes"]["load"]
    assert host["num_requests"] == load["num_requests"] > 0
    for stats in (host, load):
        assert stats["num_ok"] > 0 and stats["ttft_p50_ms"] > 0
        assert 0.0 <= stats["slo_attainment"] <= 1.0
        assert stats["num_cold_starts_metrics"] >= 1
    # host mode maps each model once per worker; load (budget below one model) reloads
    assert host["num_cold_starts_metrics"] <= 2 <= load["num_cold_starts_metrics"]
    assert host["host_store_bytes"] > 0
    assert host["cold_start_source"] == load["cold_start_source"] == "stream"  # X-Cold-Start
    assert host["private_weight_bytes"] == 0 < load["private_weight_bytes"] <= load["private_weight_peak_bytes"]
    assert load["private_weight_source"] == "worker heartbeats"
    assert "--modes host,load" in (out / "report.md").read_text()
    assert (out / "ttft_cdf.png").exists() and (out / "slo_over_time.png").exists()
