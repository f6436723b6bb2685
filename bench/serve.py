"""`c2cserve bench serve`: replay one serverless trace against each residency mode.

For every mode (`host`: weights mapped from the shared host store; `load`: the
ServerlessLLM-style baseline copying a model into worker memory on a cold start, LRU
under a budget; `dedicated`: models pinned to workers) a fresh local cluster starts
(embedded NATS + Redis, `services.launcher.LocalCluster`), the same trace is replayed
open-loop by an async streaming client, and DIR gets summary.json, records.jsonl,
report.md, ttft_cdf.png and slo_over_time.png. SLOs default to a multiple of a warm
single request measured on this machine first (printed). Catalog: see bench.catalog.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import time
from pathlib import Path

from bench import client
from bench.catalog import (
    DEFAULT_CATALOG,
    context_window,
    describe,
    ensure_default_catalog,
    list_catalog,
    weight_bytes,
)
from bench.client import PlannedRequest, PromptMaker, RequestRecord, replay, send_one
from bench.report import attribute_cold_starts, markdown_table, summarize, write_outputs
from bench.workload import TraceRequest, generate_trace, load_azure_trace
from services.config import RESIDENCY_MODES
from services.errors import InvalidRequest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--modes", default="host,load,dedicated", help="comma-separated residency modes to run")
    add("--duration", type=float, default=60.0, help="trace duration in seconds")
    add("--trace", default=None, help="Azure LLM inference trace CSV to replay (default: synthetic)")
    add("--time-scale", type=float, default=1.0, help="--trace: multiply its times (0.5 = twice as fast)")
    add("--rate", type=float, default=None, help="mean requests/s (default: --load-factor x measured capacity)")
    add("--load-factor", type=float, default=0.5, help="default rate = this x workers / warm e2e latency")
    add("--workers", type=int, default=2, help="workers (CPU slices) per cluster")
    add("--catalog", default=None, help=f"checkpoint folders to serve (default: {DEFAULT_CATALOG})")
    add("--models", type=int, default=None, help="serve the first N models of the catalog")
    add("--shape", default="conversation", choices=["conversation", "code"], help="length shape")
    add("--cv", type=float, default=2.0, help="coefficient of variation of inter-arrivals")
    add("--zipf", type=float, default=1.1, help="Zipf exponent of model popularity")
    add("--on-off", default="20,20", help="mean on,off period seconds per model ('none': always on)")
    add("--length-scale", type=float, default=0.1, help="scale Azure-shaped lengths (small models)")
    add("--max-prompt-tokens", type=int, default=256, help="clamp prompt lengths")
    add("--max-output-tokens", type=int, default=32, help="clamp output lengths")
    add("--ttft-slo-ms", type=float, default=None, help="TTFT SLO (default: --slo-scale x warm TTFT)")
    add("--tpot-slo-ms", type=float, default=None, help="TPOT SLO (default: --slo-scale x warm TPOT)")
    add("--slo-scale", type=float, default=5.0, help="default SLOs = this x a warm single request")
    add("--load-budget-mb", type=float, default=None, help="load mode: private weight MB per worker "
        "(default: 40%% of the catalog's weight bytes)")
    add("--seed", type=int, default=0, help="trace and prompt seed")
    add("--out", required=True, help="output folder")
    add("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    modes = _parse_modes(args.modes)
    _check_positive(args)
    model_dirs = _model_dirs(args)
    catalog_bytes = sum(weight_bytes(d) for d in model_dirs)
    budget_bytes = int(args.load_budget_mb * 2**20) if args.load_budget_mb else int(0.4 * catalog_bytes)
    print(f"catalog: {len(model_dirs)} models, {catalog_bytes / 2**20:.1f} MB of weights; "
          f"load budget {budget_bytes / 2**20:.1f} MB per worker")
    lengths = _length_limits(args, model_dirs)
    slo, rate = _calibrate(args, model_dirs, lengths)
    trace = _build_trace(args, len(model_dirs), rate, lengths)
    if not trace:
        raise InvalidRequest("the trace is empty: raise --rate or --duration")
    planned = _plan(trace, model_dirs, args.seed)
    print(f"trace: {len(trace)} requests over {trace[-1].t_s:.1f} s ({len(trace) / args.duration:.2f} req/s)")
    records_by_mode, modes_summary, notes = {}, {}, []
    for mode in modes:
        records, extra = _run_mode(mode, args, model_dirs, planned, budget_bytes,
                                   (slo["ttft_slo_ms"], slo["tpot_slo_ms"]))
        records_by_mode[mode] = records
        modes_summary[mode] = {**summarize(records, slo["ttft_slo_ms"] / 1e3, slo["tpot_slo_ms"] / 1e3), **extra}
        notes += extra.pop("notes", [])
    summary = {
        "command": _command_line(args),
        "setup": _setup(args, model_dirs, catalog_bytes, budget_bytes, slo, rate, len(trace), lengths),
        "modes": modes_summary,
    }
    notes += _standard_notes(modes_summary)
    out_dir = Path(args.out)
    write_outputs(out_dir, summary, records_by_mode, notes)
    print(markdown_table(summary))
    print(f"wrote {out_dir}/summary.json, report.md, ttft_cdf.png, slo_over_time.png")
    return 0


# ---------------------------------------------------------------- arguments and trace


def _parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in RESIDENCY_MODES]
    if not modes or bad:
        raise InvalidRequest(f"--modes must be a comma-separated subset of {','.join(RESIDENCY_MODES)}, got {text!r}")
    return modes


def _check_positive(args) -> None:
    for name in ("duration", "workers", "slo_scale", "load_factor", "length_scale", "max_prompt_tokens", "max_output_tokens"):
        if getattr(args, name) <= 0:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be > 0")
    if args.rate is not None and args.rate <= 0:
        raise InvalidRequest("--rate must be > 0")


def _model_dirs(args) -> list[Path]:
    if args.catalog:
        dirs = list_catalog(Path(args.catalog))
    else:
        dirs = ensure_default_catalog()
    return dirs[: args.models] if args.models else dirs


def _length_limits(args, model_dirs: list[Path]) -> dict:
    window = min(context_window(d) for d in model_dirs)
    max_output = min(args.max_output_tokens, max(1, window // 4))
    max_prompt = min(args.max_prompt_tokens, window - max_output - 8)
    return {"max_prompt_tokens": max_prompt, "max_output_tokens": max_output, "context_window": window}


def _on_off(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    try:
        on_s, off_s = (float(v) for v in text.split(","))
    except ValueError:
        raise InvalidRequest(f"--on-off must be 'ON_S,OFF_S' or 'none', got {text!r}") from None
    return on_s, off_s


def _build_trace(args, num_models: int, rate: float, lengths: dict) -> list[TraceRequest]:
    clamp = dict(max_prompt_tokens=lengths["max_prompt_tokens"], max_output_tokens=lengths["max_output_tokens"],
                 length_scale=args.length_scale)
    if args.trace:
        full = load_azure_trace(args.trace, num_models, seed=args.seed, time_scale=args.time_scale,
                                zipf_s=args.zipf, **clamp)
        return [r for r in full if r.t_s < args.duration]
    return generate_trace(num_models, args.duration, rate, seed=args.seed, zipf_s=args.zipf, cv=args.cv,
                          on_off=_on_off(args.on_off), shape=args.shape, **clamp)


def _plan(trace: list[TraceRequest], model_dirs: list[Path], seed: int) -> list[PlannedRequest]:
    makers = {i: PromptMaker(d, seed=seed + i) for i, d in enumerate(model_dirs)}
    return [
        PlannedRequest(i, r.t_s, model_dirs[r.model_index].name, makers[r.model_index].make(r.prompt_tokens),
                       r.prompt_tokens, r.output_tokens)
        for i, r in enumerate(trace)
    ]


# ---------------------------------------------------------------- SLO calibration


def _calibrate(args, model_dirs: list[Path], lengths: dict) -> tuple[dict, float]:
    """SLOs and rate: from the flags, or measured on a warm host-mode cluster.

    Every model gets a few sequential requests; its warm figure is the best of all but
    the first (which maps it). SLO = --slo-scale x the slowest model's warm figure, so an
    unloaded system meets it for every model; rate = --load-factor x workers / the mean
    warm e2e latency.
    """
    if args.ttft_slo_ms and args.tpot_slo_ms and (args.rate or args.trace):
        slo = {"ttft_slo_ms": args.ttft_slo_ms, "tpot_slo_ms": args.tpot_slo_ms, "slo_source": "flags"}
        return slo, args.rate or 0.0
    probe = _probe_shape(args, lengths)
    print(f"calibrating: warm single requests to each model ({probe['prompt_tokens']} prompt tokens, "
          f"{probe['max_tokens']} output tokens)", flush=True)
    warm = _measure_warm(args, model_dirs, probe)
    ttft_model = max(warm, key=lambda m: warm[m][0])
    tpot_model = max(warm, key=lambda m: warm[m][1])
    ttft_s, tpot_s = warm[ttft_model][0], warm[tpot_model][1]
    e2e_s = sum(w[2] for w in warm.values()) / len(warm)
    slo = {
        "ttft_slo_ms": args.ttft_slo_ms or round(args.slo_scale * ttft_s * 1e3, 1),
        "tpot_slo_ms": args.tpot_slo_ms or round(args.slo_scale * tpot_s * 1e3, 1),
        "slo_source": f"{args.slo_scale:g} x the slowest model's warm single request (TTFT {ttft_s * 1e3:.1f} ms "
                      f"of {ttft_model} at {probe['prompt_tokens']} prompt tokens, TPOT {tpot_s * 1e3:.1f} ms "
                      f"of {tpot_model}), unless flagged",
        "warm_ms_by_model": {m: {"ttft": round(t * 1e3, 2), "tpot": round(p * 1e3, 2), "e2e": round(e * 1e3, 2)}
                             for m, (t, p, e) in warm.items()},
    }
    rate = args.rate or round(args.load_factor * args.workers / e2e_s, 3)
    print(f"SLOs: TTFT {slo['ttft_slo_ms']} ms, TPOT {slo['tpot_slo_ms']} ms; rate {rate} req/s", flush=True)
    return slo, rate


def _probe_shape(args, lengths: dict) -> dict:
    """The probe request: the trace's p90 prompt length, median output length."""
    sample = generate_trace(4, 600, 5, seed=args.seed, shape=args.shape, on_off=None, length_scale=args.length_scale,
                            max_prompt_tokens=lengths["max_prompt_tokens"], max_output_tokens=lengths["max_output_tokens"])
    prompts = sorted(r.prompt_tokens for r in sample)
    outputs = sorted(r.output_tokens for r in sample)
    return {"prompt_tokens": prompts[int(0.9 * len(prompts))], "max_tokens": max(4, outputs[len(outputs) // 2])}


def _measure_warm(args, model_dirs: list[Path], probe: dict, num_requests: int = 3) -> dict[str, tuple]:
    """model id -> (warm TTFT s, warm TPOT s, warm e2e s), each the best after the first request."""
    from bench.report import tpot_s
    from services.launcher import LocalCluster

    warm = {}
    with LocalCluster(model_dirs, num_workers=args.workers, residency="host") as cluster:
        for model_dir in model_dirs:
            maker = PromptMaker(model_dir, seed=args.seed)
            records = asyncio.run(_sequential(cluster.url, model_dir.name, maker, probe, num_requests))
            ok = [r for r in records[1:] if r.ok]
            if not ok:
                errors = "; ".join(sorted({r.error for r in records if r.error}))[:300]
                raise InvalidRequest(f"calibration requests to {model_dir.name} failed: {errors or 'no tokens'}")
            tpots = [t for t in map(tpot_s, ok) if t is not None]
            warm[model_dir.name] = (min(r.ttft_s for r in ok), min(tpots, default=0.0), min(r.e2e_s for r in ok))
    return warm


async def _sequential(url: str, model_id: str, maker: PromptMaker, probe: dict, n: int) -> list[RequestRecord]:
    import aiohttp

    records = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for i in range(n):
            req = PlannedRequest(i, 0.0, model_id, maker.make(probe["prompt_tokens"]), probe["prompt_tokens"],
                                 probe["max_tokens"])
            records.append(await send_one(session, url, req, time.perf_counter(), {"ignore_eos": True}))
    return records


# ---------------------------------------------------------------- one mode


def _run_mode(mode: str, args, model_dirs, planned, budget_bytes,
              slo_ms: tuple[float, float]) -> tuple[list[RequestRecord], dict]:
    """Start a fresh cluster in `mode`, replay the plan, read cold starts and memory."""
    from services.launcher import LocalCluster

    store_root = _store_root(mode)
    try:
        kwargs = _cluster_kwargs(mode, model_dirs, args.workers, budget_bytes, planned, store_root)
        # the SLOs this run is judged by are the system's own (services/slo.py): the step
        # policy orders by them and the controller steers to them, in every mode alike
        kwargs["extra_env"].update(C2C_TTFT_SLO_MS=str(slo_ms[0]), C2C_TPOT_SLO_MS=str(slo_ms[1]))
        print(f"[{mode}] starting {args.workers} workers ...", flush=True)
        started = time.perf_counter()
        with LocalCluster(model_dirs, num_workers=args.workers, **kwargs) as cluster:
            print(f"[{mode}] up in {time.perf_counter() - started:.1f} s; replaying {len(planned)} requests", flush=True)
            before = client.cold_start_counts(cluster.url)
            label = None if args.no_progress else mode
            records, events = asyncio.run(replay(cluster.url, planned, extra={"ignore_eos": True},
                                                 progress_label=label, poll_metrics_s=0.25))
            after = client.cold_start_counts(cluster.url)
            hashes = asyncio.run(client.worker_hashes(cluster.redis_url))
            extra = _memory(cluster, hashes, store_root)
    finally:
        shutil.rmtree(store_root, ignore_errors=True)
    if mode == "dedicated":
        extra["pinned"] = kwargs["pinned"]
    extra["num_cold_starts_metrics"] = None if after is None else sum(after.values()) - sum((before or {}).values())
    from_stream = any(r.cold_start is not None for r in records)
    attribute_cold_starts(records, events)
    extra["cold_start_source"] = "stream" if from_stream else "/metrics counter, attributed by time"
    failed = [r.error for r in records if not r.ok]
    if failed:
        extra["notes"] = [f"{mode}: {len(failed)} failed requests, e.g. {failed[0]!r}"]
    return records, extra


def _memory(cluster, hashes: dict, store_root: Path) -> dict:
    """Host store bytes; private weight bytes from the heartbeats (else the worker logs),
    and their peak, which only the logs' load/evict lines tell."""
    logs = [cluster.log_tail(w, num_lines=1_000_000) for w in cluster.worker_ids]
    from_logs = client.private_bytes_from_logs(logs)
    from_heartbeats = client.private_weight_bytes(hashes)
    if from_heartbeats is not None:
        from_logs.update(private_weight_bytes=from_heartbeats, private_weight_source="worker heartbeats")
    return {"host_store_bytes": _host_store_bytes(store_root), **from_logs}


def _store_root(mode: str) -> Path:
    """A fresh host store folder for one mode's cluster (removed after the mode)."""
    store_root = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / f"c2c-bench-{os.getpid()}-{mode}"
    shutil.rmtree(store_root, ignore_errors=True)
    store_root.mkdir(parents=True)
    return store_root


def _cluster_kwargs(mode: str, model_dirs: list[Path], num_workers: int, budget_bytes: int,
                    planned: list[PlannedRequest], store_root: Path) -> dict:
    """LocalCluster kwargs of a mode, using the host store folder `store_root`."""
    # every mode starts with no prefill autotune decisions (its own file), so no mode's
    # cold starts skip the timing runs an earlier mode paid for
    env = {"C2C_HOST_STORE": str(store_root), "C2C_KV_CACHE_BYTES": str(64 << 20),
           "C2C_AUTOTUNE_FILE": str(store_root / "prefill_autotune.json")}
    kwargs: dict = {"residency": mode, "extra_env": env}
    if mode == "load":
        env["C2C_LOAD_BUDGET_BYTES"] = str(budget_bytes)
    if mode == "dedicated":
        model_ids = [d.name for d in model_dirs]
        counts = [sum(1 for r in planned if r.model_id == m) for m in model_ids]
        kwargs["pinned"] = pin_models(model_ids, num_workers, counts)
    if mode in ("host", "dedicated"):
        _fill_host_store(store_root, model_dirs)
    return kwargs


def _fill_host_store(store_root: Path, model_dirs: list[Path]) -> None:
    """The host-store premise: the catalog is resident in node memory before traffic, as
    after registration (the one-time fill is timed and printed, not on the request path)."""
    from worker.hoststore import HostStore

    started = time.perf_counter()
    store = HostStore(store_root)
    for model_dir in model_dirs:
        store.make_resident(model_dir)
    print(f"host store filled with {len(model_dirs)} models in {time.perf_counter() - started:.2f} s "
          f"(once per node)", flush=True)


def pin_models(model_ids: list[str], num_workers: int, weights: list[float]) -> dict[int, list[str]]:
    """Dedicated mode: models, heaviest first, each to the least-loaded worker by weight.

    The bench passes each model's request count in the trace (an oracle static placement,
    the best case for the baseline). A worker left without a model (more workers than
    models) also gets the heaviest one.
    """
    order = sorted(range(len(model_ids)), key=lambda i: (-weights[i], i))
    load = [0.0] * num_workers
    pinned: dict[int, list[str]] = {w: [] for w in range(num_workers)}
    for i in order:
        worker = min(range(num_workers), key=lambda w: (load[w], w))
        pinned[worker].append(model_ids[i])
        load[worker] += weights[i]
    for worker in pinned:
        pinned[worker] = pinned[worker] or [model_ids[order[0]]]
    return pinned


def _host_store_bytes(store_root: Path) -> int:
    return sum(f.stat().st_size for f in store_root.rglob("*") if f.is_file() and f.name != "prefill_autotune.json")


# ---------------------------------------------------------------- summary


def _setup(args, model_dirs, catalog_bytes, budget_bytes, slo, rate, num_requests, lengths) -> dict:
    return {
        **slo,
        "models": {d.name: describe(d) for d in model_dirs},
        "catalog_weight_bytes": catalog_bytes,
        "load_budget_bytes_per_worker": budget_bytes,
        "workers": args.workers,
        "duration_s": args.duration,
        "rate_rps": rate,
        "num_requests": num_requests,
        "trace": args.trace or {"shape": args.shape, "cv": args.cv, "zipf": args.zipf, "on_off_s": args.on_off,
                                "length_scale": args.length_scale, "seed": args.seed},
        **lengths,
        "slo_window_s": max(5.0, args.duration / 20),
    }


def _standard_notes(modes: dict) -> list[str]:
    notes = ["Cold starts per request come from the gateway's stream; when it does not expose them, "
             "`num_cold_starts_metrics` (delta of c2c_cold_starts_total on /metrics) is the count."]
    for mode, stats in modes.items():
        if not stats.get("cold_start_known"):
            notes.append(f"{mode}: the stream carried no per-request cold-start flag; cold TTFT and overhead are n/a.")
    return notes


def _command_line(args) -> str:
    """The command that reproduces this run: every option that differs from its default."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args(["--out", args.out]))
    parts = ["c2cserve", "bench", "serve"]
    for action in parser._actions:
        key = action.dest
        if key == "help" or key not in defaults:
            continue
        value = getattr(args, key, None)
        if key == "out" or value != defaults[key]:
            flag = action.option_strings[-1]
            parts += [flag] if action.nargs == 0 else [flag, shlex.quote(str(value))]
    return " ".join(parts)
