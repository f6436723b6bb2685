"""`c2cserve bench coldstart`: what one cold start costs a worker, per residency mode.

Same process, same catalog, side by side. For each mode:
- host (this design): the model is resident in the node's host store (filled once before,
  timed apart, as after registration); a cold start maps it.
- load (the ServerlessLLM-style baseline): a cold start copies the weights into private
  memory (from the page cache: the baseline's best case).
For every model and round: a one-token request to the model while it is not loaded
(cold), the same request again (warm), then the model is evicted. Cold minus warm is
what the cold start added. Before any timing, one untimed pass over every model settles
what is paid once per process whatever the mode (kernel code, prefill autotune), so
the rows compare residency, not warm-up order. Prints a table; writes --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from bench.catalog import ensure_default_catalog, weight_bytes
from bench.output import command_line, publish
from services.errors import InvalidRequest

RESULTS = Path(__file__).resolve().parent / "results" / "coldstart.txt"
PROMPT = "Serverless inference keeps every model in host memory. " * 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="*", default=None,
                        help="checkpoint folders (default: the serve benchmark's 8-model catalog)")
    parser.add_argument("--modes", default="host,load", help="comma-separated: host, load (default both)")
    parser.add_argument("--rounds", type=int, default=5, help="cold/warm pairs per model and mode (default 5)")
    parser.add_argument("--out", default=str(RESULTS), help="results file")


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("host", "load") for m in modes):
        raise InvalidRequest(f"--modes must list host and/or load, got {args.modes!r}", param="--modes")
    if args.rounds < 1:
        raise InvalidRequest("--rounds must be at least 1", param="--rounds")
    model_dirs = [Path(m) for m in args.models] if args.models else ensure_default_catalog()
    for model_dir in model_dirs:
        if not (model_dir / "config.json").is_file():
            raise InvalidRequest(f"{model_dir}: not a checkpoint folder (no config.json)", param="--models")
    store_root = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / f"c2c-coldstart-{os.getpid()}"
    try:
        _settle(model_dirs, store_root / "settle")
        results = {mode: measure_mode(mode, model_dirs, args.rounds, store_root / mode) for mode in modes}
    finally:
        shutil.rmtree(store_root, ignore_errors=True)
    publish(render(command_line("coldstart"), results, args.rounds), args.out)
    return 0


def _engine(mode: str, store_root: Path):
    from worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(residency=mode, host_store_root=str(store_root), kv_cache_bytes=64 << 20))
    engine.warmup()
    return engine


def _request_s(engine, model_id: str, expect_cold: bool | None = None) -> float:
    """Seconds of one request; checks the engine saw the cold start as expected."""
    from worker.engine import SamplingParams

    start = time.perf_counter()
    out = engine.generate(model_id, PROMPT, SamplingParams(max_tokens=1, temperature=0.0))
    elapsed = time.perf_counter() - start
    if out.error:
        raise InvalidRequest(f"{model_id}: the request failed: {out.error}")
    if expect_cold is not None and out.cold_start != expect_cold:
        raise RuntimeError(f"{model_id}: expected a {'cold' if expect_cold else 'warm'} request")
    return elapsed


def _settle(model_dirs: list[Path], store_root: Path) -> None:
    """One untimed cold + warm request per model (compiled code, autotune decisions)."""
    engine = _engine("host", store_root)
    for model_dir in model_dirs:
        engine.add_model(model_dir.name, model_dir)
        _request_s(engine, model_dir.name)
        engine.evict(model_dir.name)


def measure_mode(mode: str, model_dirs: list[Path], rounds: int, store_root: Path) -> tuple[list[dict], float]:
    """Per model: cold and warm request seconds over `rounds`, evicting after each pair;
    and the seconds registering the catalog took (host: copying it into the store)."""
    engine = _engine(mode, store_root)
    fill_start = time.perf_counter()
    for model_dir in model_dirs:
        engine.add_model(model_dir.name, model_dir)  # host: made resident now, not timed below
    fill_s = time.perf_counter() - fill_start
    rows = []
    for model_dir in model_dirs:
        cold, warm = [], []
        for _ in range(rounds):
            cold.append(_request_s(engine, model_dir.name, expect_cold=True))
            warm.append(_request_s(engine, model_dir.name, expect_cold=False))
            engine.evict(model_dir.name)
        rows.append({"model": model_dir.name, "weight_mb": weight_bytes(model_dir) / 1e6,
                     "cold_ms": 1e3 * statistics.median(cold), "warm_ms": 1e3 * statistics.median(warm),
                     "added_ms": 1e3 * statistics.median(c - w for c, w in zip(cold, warm, strict=True))})
    return rows, fill_s


def render(command: str, results: dict[str, tuple[list[dict], float]], rounds: int) -> str:
    """The table, then one line per mode; results: mode -> (rows, seconds to register)."""
    lines = [f"$ {command}",
             f"one-token request ({len(PROMPT)} chars of prompt), cold (model not loaded) then warm, "
             f"{rounds} rounds per model, medians; machine: {os.cpu_count()} cores, "
             f"load average {os.getloadavg()[0]:.1f} at the end",
             f"{'mode':<6}{'model':<16}{'weights MB':>11}{'cold ms':>10}{'warm ms':>10}{'added ms':>10}"]
    for mode, (rows, _) in results.items():
        for r in rows:
            lines.append(f"{mode:<6}{r['model']:<16}{r['weight_mb']:>11.1f}{r['cold_ms']:>10.1f}"
                         f"{r['warm_ms']:>10.1f}{r['added_ms']:>10.1f}")
    lines.append("")
    for mode, (rows, register_s) in results.items():
        added = [r["added_ms"] for r in rows]
        register = f"; filling the host store took {register_s:.2f} s, once per node" if mode == "host" else ""
        lines.append(f"{mode}: a cold start adds {statistics.median(added):.1f} ms at the median over models "
                     f"(max {max(added):.1f}){register}")
    return "\n".join(lines) + "\n"
