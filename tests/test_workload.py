"""The serverless workload generator and the Azure trace loader."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench.workload import (
    LENGTH_SHAPES,
    TraceRequest,
    generate_trace,
    load_azure_trace,
    write_azure_csv,
    zipf_weights,
)
from services.errors import InvalidRequest


def _column(trace, name):
    return np.array([getattr(r, name) for r in trace])


def test_zipf_popularity_without_on_off_matches_the_weights():
    trace = generate_trace(20, 600, 200, seed=3, zipf_s=1.1, on_off=None)
    counts = np.bincount(_column(trace, "model_index"), minlength=20)
    shares = counts / counts.sum()
    expected = zipf_weights(20, 1.1)
    assert shares[0] == pytest.approx(expected[0], abs=0.01)
    assert shares[0] > 2 * shares[3] > 0
    assert abs(shares - expected).max() < 0.01


def test_on_off_keeps_the_popular_model_on_top_and_silences_models():
    trace = generate_trace(10, 600, 100, seed=4, on_off=(20.0, 40.0))
    models = _column(trace, "model_index")
    counts = np.bincount(models, minlength=10)
    assert counts.argmax() == 0
    assert counts[0] / counts.sum() > 0.2
    # with on/off periods, every model has long silent gaps well past its mean gap
    t_s = _column(trace, "t_s")
    gaps = np.diff(t_s[models == 1])
    assert gaps.max() > 10.0 > 20 * np.median(gaps)


def test_inter_arrivals_are_bursty():
    for on_off in (None, (30.0, 30.0)):
        t_s = _column(generate_trace(5, 900, 50, seed=5, cv=2.0, on_off=on_off), "t_s")
        gaps = np.diff(t_s)
        assert np.all(gaps >= 0)
        assert gaps.std() / gaps.mean() > 1.5
    # cv=1 is Poisson-like; the knob changes burstiness
    gaps = np.diff(_column(generate_trace(5, 900, 50, seed=5, cv=1.0, on_off=None), "t_s"))
    assert 0.9 < gaps.std() / gaps.mean() < 1.1


def test_rate_and_duration_are_respected():
    trace = generate_trace(8, 300, 20, seed=6, on_off=None)
    t_s = _column(trace, "t_s")
    assert t_s.min() >= 0 and t_s.max() < 300
    assert len(trace) == pytest.approx(20 * 300, rel=0.2)


def test_same_seed_same_trace_other_seed_other_trace():
    a = generate_trace(12, 120, 30, seed=7)
    b = generate_trace(12, 120, 30, seed=7)
    c = generate_trace(12, 120, 30, seed=8)
    assert a == b
    assert a != c


@pytest.mark.parametrize("shape", ["conversation", "code"])
def test_length_shapes_follow_the_azure_medians(shape):
    trace = generate_trace(4, 600, 100, seed=9, shape=shape, on_off=None)
    prompt_median, _, output_median, _ = LENGTH_SHAPES[shape]
    assert np.median(_column(trace, "prompt_tokens")) == pytest.approx(prompt_median, rel=0.1)
    assert np.median(_column(trace, "output_tokens")) == pytest.approx(output_median, rel=0.15)
    assert np.percentile(_column(trace, "prompt_tokens"), 99) > 5 * prompt_median  # heavy tail


def test_clamping_and_scaling():
    trace = generate_trace(4, 120, 50, seed=10, max_prompt_tokens=64, max_output_tokens=8, length_scale=0.05)
    prompt, output = _column(trace, "prompt_tokens"), _column(trace, "output_tokens")
    assert prompt.min() >= 1 and prompt.max() == 64
    assert output.min() >= 1 and output.max() == 8
    assert np.median(prompt) == pytest.approx(1020 * 0.05, rel=0.15)


def test_bad_arguments_are_named_errors():
    with pytest.raises(InvalidRequest, match="shape"):
        generate_trace(4, 10, 1, shape="poetry")
    with pytest.raises(InvalidRequest, match="positive"):
        generate_trace(0, 10, 1)
    with pytest.raises(InvalidRequest, match="on_off"):
        generate_trace(4, 10, 1, on_off=(0.0, 1.0))


def test_large_trace_is_fast():
    start = time.perf_counter()
    trace = generate_trace(500, 3600, 60, seed=11)
    elapsed = time.perf_counter() - start
    assert len(trace) > 150_000
    assert elapsed < 10.0  # about a second on a quiet machine; generous for a busy one


def test_azure_csv_round_trip(tmp_path):
    original = generate_trace(6, 60, 10, seed=12, max_prompt_tokens=4000)
    path = write_azure_csv(tmp_path / "trace.csv", original)
    assert path.read_text().splitlines()[0] == "TIMESTAMP,ContextTokens,GeneratedTokens"
    loaded = load_azure_trace(path, num_models=6, popularity="round_robin")
    assert len(loaded) == len(original)
    offset = original[0].t_s
    for a, b in zip(original, loaded, strict=True):
        assert b.t_s == pytest.approx(a.t_s - offset, abs=1e-6)
        assert (b.prompt_tokens, b.output_tokens) == (a.prompt_tokens, a.output_tokens)
    assert [r.model_index for r in loaded[:7]] == [0, 1, 2, 3, 4, 5, 0]


def test_azure_loader_parses_real_format_rows(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.1234567+00:00,879,15\n"
    )
    loaded = load_azure_trace(path, num_models=3, popularity="zipf", seed=1, time_scale=0.5, max_output_tokens=100)
    assert [round(r.t_s, 6) for r in loaded] == [0.0, round(4.314579 / 2, 6), round(4.4428667 / 2, 6)]
    assert [r.prompt_tokens for r in loaded] == [374, 396, 879]
    assert [r.output_tokens for r in loaded] == [44, 100, 15]
    assert all(isinstance(r, TraceRequest) and 0 <= r.model_index < 3 for r in loaded)
    assert len(load_azure_trace(path, num_models=3, limit=2)) == 2


def test_azure_loader_errors_name_the_file(tmp_path):
    with pytest.raises(InvalidRequest, match="not found"):
        load_azure_trace(tmp_path / "missing.csv", 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt\n1,2\n")
    with pytest.raises(InvalidRequest, match="bad.csv"):
        load_azure_trace(bad, 3)
