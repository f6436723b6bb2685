"""Serverless multi-model workloads: a synthetic generator and an Azure trace loader.

`generate_trace` draws N models' traffic: Zipf popularity over models, bursty aggregate
arrivals (Gamma inter-arrivals with CV > 1), per-model on/off periods (only models that
are "on" receive requests), and prompt/output lengths shaped like the public Azure LLM
inference traces 2023 (conversation and code). `load_azure_trace` replays the real CSVs.

Length shapes (lognormal, `median` and `sigma` of ln(tokens)). Source: the Azure LLM
inference traces 2023 (github.com/Azure/AzurePublicDataset, AzureLLMInferenceDataset2023)
as characterized in Patel et al., "Splitwise", ISCA 2024, section III: conversation has a
median prompt of ~1020 tokens and a median output of ~129 tokens; code has a median
prompt of ~1500 tokens and a median output of ~13 tokens, both with long right tails
(prompts up to ~8k tokens, conversation outputs up to ~1-2k). The sigmas are our fits
to those reported medians and tail spans (p99 / median ~ 8-10x), not a maximum-
likelihood fit of the raw CSV (not available offline); pass the CSV to
`load_azure_trace` to replay the real lengths instead.

Everything is vectorized with numpy: a 1-hour, 500-model trace with hundreds of thousands
of requests is generated in about a second.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.errors import InvalidRequest

# shape -> (prompt median, prompt sigma, output median, output sigma); see module docstring
LENGTH_SHAPES: dict[str, tuple[float, float, float, float]] = {
    "conversation": (1020.0, 1.0, 129.0, 0.9),
    "code": (1500.0, 0.9, 13.0, 1.2),
}


@dataclass(slots=True)
class TraceRequest:
    t_s: float  # arrival, seconds from the start of the trace
    model_index: int  # 0 = most popular under Zipf
    prompt_tokens: int
    output_tokens: int


def zipf_weights(num_models: int, zipf_s: float) -> np.ndarray:
    """Normalized popularity p_k ~ 1 / k^s for ranks k = 1..num_models. # [num_models]"""
    ranks = np.arange(1, num_models + 1, dtype=np.float64)
    weights = ranks**-zipf_s
    return weights / weights.sum()


def generate_trace(
    num_models: int,
    duration_s: float,
    rate_rps: float,
    seed: int = 0,
    zipf_s: float = 1.1,
    cv: float = 2.0,
    on_off: tuple[float, float] | None = (30.0, 30.0),
    shape: str = "conversation",
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
    length_scale: float = 1.0,
) -> list[TraceRequest]:
    """A bursty multi-model trace, sorted by arrival time; deterministic for a seed.

    Aggregate arrivals are a Gamma renewal process of mean rate `rate_rps` and
    inter-arrival coefficient of variation `cv` (shape 1/cv^2). `on_off` = (mean on s,
    mean off s): each model alternates exponential on/off periods, and an arrival goes to
    a Zipf-popular model among those on at that instant (dropped if none is on).
    Lengths: lognormal per `shape`, times `length_scale`, clamped to [1, max_*_tokens].
    Raises InvalidRequest for non-positive sizes or an unknown shape.
    """
    _check_args(num_models, duration_s, rate_rps, cv, shape, on_off)
    rng = np.random.default_rng(seed)
    t_s = _gamma_arrivals(rng, duration_s, rate_rps, cv)
    probs = zipf_weights(num_models, zipf_s)
    if on_off is None:
        model_index = rng.choice(num_models, size=t_s.size, p=probs)
    else:
        schedule = _OnOffSchedule(rng, num_models, duration_s, on_off)
        model_index = _assign_on_models(rng, t_s, probs, schedule)
        keep = model_index >= 0
        t_s, model_index = t_s[keep], model_index[keep]
    prompt, output = _draw_lengths(rng, t_s.size, shape, length_scale)
    prompt = _clamp(prompt, max_prompt_tokens)
    output = _clamp(output, max_output_tokens)
    return _to_requests(t_s, model_index, prompt, output)


def load_azure_trace(
    path: str | Path,
    num_models: int,
    popularity: str = "zipf",
    seed: int = 0,
    limit: int | None = None,
    time_scale: float = 1.0,
    zipf_s: float = 1.1,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
    length_scale: float = 1.0,
) -> list[TraceRequest]:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).

    Times are relative to the first row, multiplied by `time_scale` (0.5 replays twice
    as fast). Rows map to models by `popularity`: "zipf" (a seeded draw with exponent
    `zipf_s`) or "round_robin" (row i -> i % num_models). TIMESTAMP may be a datetime
    string ('2023-11-16 18:15:46.6805900', optional timezone suffix) or seconds.
    Raises InvalidRequest naming the file for a missing file, missing columns or
    unparsable values.
    """
    if popularity not in ("zipf", "round_robin"):
        raise InvalidRequest(f"popularity must be 'zipf' or 'round_robin', got {popularity!r}")
    if num_models <= 0:
        raise InvalidRequest(f"num_models must be positive, got {num_models}")
    stamps, prompt, output = _read_azure_columns(Path(path), limit)
    t_s = _parse_timestamps(stamps, path) * time_scale
    order = np.argsort(t_s, kind="stable")
    t_s, prompt, output = t_s[order] - t_s[order][0], prompt[order], output[order]
    if popularity == "round_robin":
        model_index = np.arange(t_s.size) % num_models
    else:
        rng = np.random.default_rng(seed)
        model_index = rng.choice(num_models, size=t_s.size, p=zipf_weights(num_models, zipf_s))
    prompt = _clamp(np.maximum(1, np.rint(prompt * length_scale)).astype(np.int64), max_prompt_tokens)
    output = _clamp(np.maximum(1, np.rint(output * length_scale)).astype(np.int64), max_output_tokens)
    return _to_requests(t_s, model_index, prompt, output)


def write_azure_csv(path: str | Path, trace: list[TraceRequest], start: str = "2023-11-16 18:00:00") -> Path:
    """Write a trace in the Azure CSV format (for tests and for sharing a synthetic trace)."""
    base = np.datetime64(start, "ns")
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for req in trace:
            stamp = base + np.timedelta64(int(round(req.t_s * 1e9)), "ns")
            text = str(stamp).replace("T", " ")[:27]  # 7 fractional digits, like Azure's
            writer.writerow([text, req.prompt_tokens, req.output_tokens])
    return path


# ---------------------------------------------------------------- arrivals and models


def _check_args(num_models, duration_s, rate_rps, cv, shape, on_off) -> None:
    if num_models <= 0 or duration_s <= 0 or rate_rps <= 0 or cv <= 0:
        raise InvalidRequest(
            f"num_models, duration_s, rate_rps and cv must be positive "
            f"(got {num_models}, {duration_s}, {rate_rps}, {cv})"
        )
    if shape not in LENGTH_SHAPES:
        raise InvalidRequest(f"shape must be one of {sorted(LENGTH_SHAPES)}, got {shape!r}")
    if on_off is not None and (len(on_off) != 2 or min(on_off) <= 0):
        raise InvalidRequest(f"on_off must be (mean_on_s, mean_off_s) > 0, got {on_off!r}")


def _gamma_arrivals(rng: np.random.Generator, duration_s: float, rate_rps: float, cv: float) -> np.ndarray:
    """Arrival times in [0, duration_s) of a Gamma renewal process. # [N] float64"""
    shape_k = 1.0 / cv**2
    scale = 1.0 / (rate_rps * shape_k)  # mean inter-arrival = 1 / rate
    expected = rate_rps * duration_s
    chunks, last = [], 0.0
    while last < duration_s:
        size = int(expected + 6.0 * cv * np.sqrt(expected) + 16)
        times = last + np.cumsum(rng.gamma(shape_k, scale, size=size))
        chunks.append(times)
        last = float(times[-1])
    t_s = np.concatenate(chunks)
    return t_s[t_s < duration_s]


class _OnOffSchedule:
    """Per-model alternating exponential on/off periods, queried vectorized.

    Toggle times of model m are stored in one globally sorted array, offset by
    m * stride, so "is model m on at t" for many (m, t) pairs is one searchsorted.
    """

    def __init__(self, rng: np.random.Generator, num_models: int, duration_s: float, on_off):
        mean_on, mean_off = on_off
        self.start_on = rng.random(num_models) < mean_on / (mean_on + mean_off)  # [M]
        num_periods = int(2 * duration_s / (mean_on + mean_off)) + 8
        while True:
            phase = (np.arange(num_periods)[None, :] + (~self.start_on)[:, None]) % 2  # [M, P] 0 = on
            means = np.where(phase == 0, mean_on, mean_off)
            toggles = np.cumsum(rng.exponential(1.0, size=means.shape) * means, axis=1)  # [M, P]
            if toggles[:, -1].min() > duration_s:
                break
            num_periods *= 2
        self.stride = duration_s + 2.0
        self.num_periods = num_periods
        clipped = np.minimum(toggles, duration_s + 1.0)
        self.flat = (clipped + np.arange(num_models)[:, None] * self.stride).ravel()  # [M * P]

    def is_on(self, model_index: np.ndarray, t_s: np.ndarray) -> np.ndarray:
        """[N] bool: model_index[i] is on at t_s[i]."""
        pos = np.searchsorted(self.flat, model_index * self.stride + t_s, side="right")
        num_toggles = pos - model_index * self.num_periods
        return self.start_on[model_index] ^ (num_toggles % 2 == 1)


def _assign_on_models(rng, t_s: np.ndarray, probs: np.ndarray, schedule: _OnOffSchedule, rounds: int = 32) -> np.ndarray:
    """Zipf model per arrival, restricted to models on at that time; -1 if none is on.

    Rejection sampling (vectorized) for most arrivals, then an exact [R, M] pass for the
    few left (times when only unpopular models, or none, are on).
    """
    model_index = np.full(t_s.size, -1, dtype=np.int64)
    pending = np.arange(t_s.size)
    for _ in range(rounds):
        if pending.size == 0:
            return model_index
        draw = rng.choice(probs.size, size=pending.size, p=probs)
        accepted = schedule.is_on(draw, t_s[pending])
        model_index[pending[accepted]] = draw[accepted]
        pending = pending[~accepted]
    for start in range(0, pending.size, 4096):
        idx = pending[start : start + 4096]
        models = np.arange(probs.size)
        on = schedule.is_on(np.tile(models, idx.size), np.repeat(t_s[idx], probs.size))
        weights = on.reshape(idx.size, probs.size) * probs[None, :]  # [R, M]
        totals = weights.sum(axis=1)
        cdf = np.cumsum(weights, axis=1)
        picks = (cdf < (rng.random(idx.size) * totals)[:, None]).sum(axis=1)
        model_index[idx] = np.where(totals > 0, np.minimum(picks, probs.size - 1), -1)
    return model_index


# ---------------------------------------------------------------- lengths


def _draw_lengths(rng, size: int, shape: str, length_scale: float) -> tuple[np.ndarray, np.ndarray]:
    prompt_median, prompt_sigma, output_median, output_sigma = LENGTH_SHAPES[shape]
    prompt = rng.lognormal(np.log(prompt_median * length_scale), prompt_sigma, size)
    output = rng.lognormal(np.log(output_median * length_scale), output_sigma, size)
    return (np.maximum(1, np.rint(prompt)).astype(np.int64), np.maximum(1, np.rint(output)).astype(np.int64))


def _clamp(tokens: np.ndarray, max_tokens: int | None) -> np.ndarray:
    if max_tokens is None:
        return tokens
    if max_tokens < 1:
        raise InvalidRequest(f"max token clamp must be >= 1, got {max_tokens}")
    return np.clip(tokens, 1, max_tokens)


def _to_requests(t_s, model_index, prompt, output) -> list[TraceRequest]:
    return [
        TraceRequest(t, m, p, o)
        for t, m, p, o in zip(t_s.tolist(), model_index.tolist(), prompt.tolist(), output.tolist(), strict=True)
    ]


# ---------------------------------------------------------------- Azure CSV

_TZ_SUFFIX = re.compile(r"(Z|[+-]\d\d:?\d\d)$")


def _read_azure_columns(path: Path, limit: int | None):
    if not path.is_file():
        raise InvalidRequest(f"trace file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [name.strip().lower() for name in next(reader, [])]
        try:
            cols = [header.index(name) for name in ("timestamp", "contexttokens", "generatedtokens")]
        except ValueError:
            raise InvalidRequest(f"{path}: expected columns TIMESTAMP, ContextTokens, GeneratedTokens; got {header}") from None
        rows = []
        for row in reader:
            if limit is not None and len(rows) >= limit:
                break
            if row:
                rows.append([row[c].strip() for c in cols])
    if not rows:
        raise InvalidRequest(f"{path}: no rows")
    stamps, prompt, output = zip(*rows, strict=True)
    try:
        return list(stamps), np.array(prompt, dtype=np.float64), np.array(output, dtype=np.float64)
    except ValueError as exc:
        raise InvalidRequest(f"{path}: token counts must be numbers ({exc})") from None


def _parse_timestamps(stamps: list[str], path) -> np.ndarray:
    """Seconds (float64) from datetime strings or plain numbers. # [N]"""
    try:
        return np.array(stamps, dtype=np.float64)
    except ValueError:
        pass
    cleaned = [_TZ_SUFFIX.sub("", s) for s in stamps]
    try:
        ns = np.array(cleaned, dtype="datetime64[ns]").astype(np.int64)
    except ValueError as exc:
        raise InvalidRequest(f"{path}: unparsable TIMESTAMP ({exc})") from None
    return (ns - ns.min()) / 1e9
