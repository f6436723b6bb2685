"""`c2cserve bench soak`: memory of every process over many requests.

A LocalCluster (embedded NATS + Valkey, gateway, placer, controller, N CPU workers)
serves a bounded-concurrency stream of requests over several tiny models, with prompts
and outputs of varied length (so KV blocks of every size are taken and freed). Every
`--sample-every` requests it records each process's resident set (RSS) and private
memory (USS). A worker whose private memory keeps growing while the load stays the same
leaks; one that stays near weights-in-use + KV-in-use does not. Writes
bench/results/soak.txt with its command.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import psutil

from bench.output import command_line, publish

RESULTS = Path(__file__).resolve().parent / "results" / "soak.txt"
MODELS_DIR = Path("~/.cache/c2cserve/bench/soak").expanduser()
ARCHS = (("soak-llama", "llama", 1), ("soak-qwen2", "qwen2", 2), ("soak-moe", "qwen2_moe", 3))
WORDS = "the quick brown fox jumps over a lazy dog while seven ravens watch".split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all (default 10000)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers (default 2)")
    parser.add_argument("--sample-every", type=int, default=1000, help="requests between samples (default 1000)")
    parser.add_argument("--max-prompt-words", type=int, default=400, help="longest prompt (default 400 words)")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest output (default 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="results file")


def _models() -> list[Path]:
    from worker.synth import synth_model

    dirs = []
    for name, arch, seed in ARCHS:
        path = MODELS_DIR / name
        if not (path / "config.json").is_file():
            synth_model(arch, "tiny", path, seed=seed)
        dirs.append(path)
    return dirs


def _service_processes() -> dict[str, psutil.Process]:
    """This process's children by service name (worker ids, gateway, nats-server, ...)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        found[_name_of(cmdline)] = proc
    return found


def _name_of(cmdline: list[str]) -> str:
    if "--worker-id" in cmdline:
        return cmdline[cmdline.index("--worker-id") + 1].rsplit("-", 1)[-1]
    if "services.cli" in cmdline:
        return cmdline[cmdline.index("services.cli") + 1]
    return Path(cmdline[0]).name.split()[0] if cmdline else "?"  # valkey rewrites its title


def _memory_mib(procs: dict[str, psutil.Process]) -> dict[str, tuple[float, float]]:
    """name -> (RSS MiB, USS MiB); a process gone since is left out."""
    out = {}
    for name, proc in procs.items():
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        out[name] = (info.rss / 2**20, info.uss / 2**20)
    return out


class Load:
    """Bounded-concurrency requests with random prompts and lengths; counts outcomes."""

    def __init__(self, url: str, model_ids: list[str], args: argparse.Namespace):
        self.url, self.model_ids, self.args = url, model_ids, args
        self.rng = random.Random(args.seed)
        self.num_ok = self.num_failed = 0
        self.errors: dict[str, int] = {}

    def _body(self, i: int) -> dict:
        words = self.rng.choices(WORDS, k=self.rng.randint(1, self.args.max_prompt_words))
        return {"model": self.model_ids[i % len(self.model_ids)], "prompt": " ".join(words),
                "max_tokens": self.rng.randint(1, self.args.max_tokens), "temperature": 0.7, "seed": i}

    async def run(self, session, first: int, count: int) -> None:
        bodies = [self._body(i) for i in range(first, first + count)]
        queue: asyncio.Queue = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)
        await asyncio.gather(*[self._client(session, queue) for _ in range(self.args.concurrency)])

    async def _client(self, session, queue: asyncio.Queue) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(f"{self.url}/v1/completions", json=body) as resp:
                payload = await resp.json()
            if resp.status == 200:
                self.num_ok += 1
            else:
                self.num_failed += 1
                message = payload.get("error", {}).get("message", str(resp.status))[:60]
                self.errors[message] = self.errors.get(message, 0) + 1


def _table(samples: list[tuple[int, dict[str, tuple[float, float]]]]) -> str:
    names = sorted({n for _, mem in samples for n in mem})
    lines = ["requests  " + "  ".join(f"{n[:14]:>14}" for n in names) + "   (RSS/USS MiB)"]
    for done, mem in samples:
        cells = [f"{mem[n][0]:6.0f}/{mem[n][1]:<7.0f}" if n in mem else f"{'-':>14}" for n in names]
        lines.append(f"{done:>8}  " + "  ".join(cells))
    return "\n".join(lines) + "\n"


async def _soak(url: str, model_ids: list[str], args: argparse.Namespace):
    import aiohttp

    load, samples = Load(url, model_ids, args), []
    procs = _service_processes()
    samples.append((0, _memory_mib(procs)))
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
        for first in range(0, args.requests, args.sample_every):
            count = min(args.sample_every, args.requests - first)
            await load.run(session, first, count)
            samples.append((first + count, _memory_mib(procs)))
            print(f"soak: {first + count}/{args.requests} requests, {load.num_failed} failed", flush=True)
    return load, samples, time.monotonic() - started


def run(args: argparse.Namespace) -> int:
    from services.launcher import LocalCluster

    model_dirs = _models()
    with LocalCluster(model_dirs, num_workers=args.workers) as cluster:
        load, samples, elapsed_s = asyncio.run(_soak(cluster.url, cluster.model_ids, args))
    report = [f"$ {command_line('soak')}",
              f"models: {', '.join(d.name for d in model_dirs)} (tiny); {args.workers} CPU workers; "
              f"{args.concurrency} in flight; prompts 1-{args.max_prompt_words} words, outputs 1-{args.max_tokens} tokens",
              f"machine: {psutil.cpu_count()} cores; {elapsed_s:.0f} s, {args.requests / elapsed_s:.1f} requests/s; "
              f"ok {load.num_ok}, failed {load.num_failed} {load.errors or ''}",
              _table(samples)]
    first, last = samples[1][1], samples[-1][1]
    growth = {n: last[n][1] - first[n][1] for n in last if n in first}
    report.append("private memory (USS) growth from the first sample to the last, MiB: "
                  + ", ".join(f"{n} {g:+.0f}" for n, g in sorted(growth.items())) + "\n")
    publish("\n".join(report), args.out)
    return 0 if load.num_failed == 0 else 1
