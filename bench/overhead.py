"""`c2cserve bench overhead`: latency the services add to a one-token completion.

Same run, same checkpoint, same prompt: (1) end to end through HTTP -> gateway -> NATS ->
placer -> worker -> gateway (a LocalCluster with one worker, keep-alive client,
requests one at a time), then (2) the same call straight into an in-process Engine.
Prints p50/p90/p99 of both and the difference; writes bench/results/overhead.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from bench.output import command_line, publish
from services.errors import C2CError

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.txt"
BENCH_MODEL_DIR = Path("~/.cache/c2cserve/bench/tiny-llama").expanduser()
PROMPT = "The quick brown fox jumps over the lazy dog"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=200, help="timed requests per path (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first (default 20)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a synthesized tiny llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both paths (default 1)")
    parser.add_argument("--out", default=str(RESULTS), help="results file")


def _model_dir(arg: str | None) -> Path:
    if arg:
        path = Path(arg)
        if not (path / "config.json").is_file():
            raise C2CError(f"--model {path}: not a checkpoint folder (no config.json)")
        return path
    if not (BENCH_MODEL_DIR / "config.json").is_file():
        from worker.synth import synth_model

        synth_model("llama", "tiny", BENCH_MODEL_DIR)
    return BENCH_MODEL_DIR


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples_s, n=100, method="inclusive")
    return {"p50": q[49] * 1e3, "p90": q[89] * 1e3, "p99": q[98] * 1e3, "mean": statistics.fmean(samples_s) * 1e3}


async def _through_services(url: str, model_id: str, n: int, warmup: int) -> list[float]:
    import aiohttp

    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    samples = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(warmup + n):
            start = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise C2CError(f"gateway answered {resp.status}: {payload[:200]!r}")
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    return samples


async def _straight_to_worker(nats_url: str, worker_id: str, model_id: str, n: int, warmup: int) -> list[float]:
    """NATS publish to c2c.worker.<id>.submit and wait for the final chunk (no gateway, no placer)."""
    import nats

    from services import schemas, subjects
    from services.schemas import SubmitRequest, TokenChunk

    nc = await nats.connect(nats_url)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    samples = []
    try:
        for i in range(warmup + n):
            req = SubmitRequest(f"bench-{i}", model_id, prompt=PROMPT, max_tokens=1, temperature=0.0)
            start = time.perf_counter()
            await nc.publish(subjects.worker_submit(worker_id), schemas.encode(req), reply=inbox)
            while True:
                chunk = schemas.decode(TokenChunk, (await sub.next_msg(timeout=30)).data)
                if chunk.error_code:
                    raise C2CError(f"worker answered an error: {chunk.error}")
                if chunk.is_final:
                    break
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    finally:
        await nc.close()
    return samples


def _direct(model_dir: Path, n: int, warmup: int, num_threads: int) -> list[float]:
    from worker.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(num_threads=num_threads))
    engine.add_model(model_dir.name, model_dir)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    samples = []
    for i in range(warmup + n):
        start = time.perf_counter()
        out = engine.generate(model_dir.name, PROMPT, params)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
        if out.num_generated_tokens != 1:
            raise C2CError(f"the engine generated {out.num_generated_tokens} tokens, expected 1")
    return samples


def _report(command: str, model_dir: Path, services: dict, worker: dict, direct: dict) -> str:
    lines = [
        f"$ {command}",
        f"model: {model_dir.name} ({model_dir}); one-token completion, prompt {PROMPT!r}; requests one at a time",
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        f"{'path':<44}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}",
    ]
    rows = (("HTTP -> gateway -> placer -> worker (NATS)", services),
            ("NATS -> worker (no gateway, no placer)", worker), ("Engine.generate in process", direct))
    for name, s in rows:
        lines.append(f"{name:<44}{s['p50']:9.2f}{s['p90']:9.2f}{s['p99']:9.2f}{s['mean']:9.2f}")
    added = {k: services[k] - direct[k] for k in ("p50", "p90", "p99")}
    lines.append(f"{'added by the services':<44}{added['p50']:9.2f}{added['p90']:9.2f}{added['p99']:9.2f}")
    lines.append(f"target: <= 3 ms added at p50 -> {'met' if added['p50'] <= 3.0 else 'NOT met'}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from services.launcher import LocalCluster

    if args.n < 2:
        raise C2CError("--n must be at least 2")
    model_dir = _model_dir(args.model)
    env = {"C2C_NUM_THREADS": str(args.threads)}
    with LocalCluster([model_dir], num_workers=1, extra_env=env) as cluster:
        services = percentiles_ms(asyncio.run(_through_services(cluster.url, model_dir.name, args.n, args.warmup)))
        worker = percentiles_ms(asyncio.run(_straight_to_worker(
            cluster.nats_url, cluster.worker_ids[0], model_dir.name, args.n, args.warmup)))
    direct = percentiles_ms(_direct(model_dir, args.n, args.warmup, args.threads))
    publish(_report(command_line("overhead"), model_dir, services, worker, direct), args.out)
    return 0
