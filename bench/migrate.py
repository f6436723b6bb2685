"""`c2cserve bench migrate`: live migration's downtime and total time vs context length,
through shared memory (same node) and the network path (KV bytes on NATS), beside the
re-prefill that re-dispatch would cost instead.

A LocalCluster (embedded NATS + Valkey, two CPU workers, one small synthetic llama whose
context window is widened to hold 8k tokens) serves greedy requests submitted straight to
worker 0 by this process, acting as a gateway (it reads the chunks, follows the epoch
handed over). Per context length: one request runs unmigrated (the reference output);
then, per path, the same request is moved to worker 1 after `--migrate-after` tokens
(`MigrateCommand`), `--repeats` times (medians; every downtime is listed). Measured at
this client:
- downtime_ms: the gap in the token stream, from the source's last chunk to the
  target's first (one decode step is part of it, as between any two chunks: itl_ms);
- total_ms: from the command to the target's first chunk (offer, pre-copy while the
  source decodes, stop-and-copy, resume);
- reprefill_ms: a re-dispatch's cost instead: the same prompt plus the tokens so far
  submitted to worker 1, to its first token;
- output_matches: the migrated stream's tokens equal the reference's.
Targets on this machine: downtime < 50 ms at 2k tokens same-node; downtime at least 5x
shorter than re-prefill at 4k. Prints a table (or, with --json, one JSON object).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from pathlib import Path

from bench.output import command_line, publish
from services.errors import InvalidRequest

RESULTS = Path(__file__).resolve().parent / "results" / "migrate.json"
MODEL_DIR = Path("~/.cache/c2cserve/bench/migrate-llama-small-16k").expanduser()
WINDOW_TOKENS = 16384
WAIT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192", help="prompt lengths in tokens")
    parser.add_argument("--paths", default="shm,net", help="shm (same node, shared memory) and/or net (NATS)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument("--migrate-after", type=int, default=16, help="tokens streamed before the move (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="migrations per (path, context): medians (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", default=str(RESULTS), help="results file (JSON, with the command)")


def run(args: argparse.Namespace) -> int:
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not contexts or any(c < 1 or c + args.max_tokens > WINDOW_TOKENS for c in contexts):
        raise InvalidRequest(f"--contexts: each in [1, {WINDOW_TOKENS - args.max_tokens}]", param="--contexts")
    if not paths or any(p not in ("shm", "net") for p in paths):
        raise InvalidRequest("--paths lists shm and/or net", param="--paths")
    if args.repeats < 1:
        raise InvalidRequest("--repeats must be at least 1", param="--repeats")
    if not 1 <= args.migrate_after < args.max_tokens - 1:
        raise InvalidRequest("--migrate-after must be in [1, max_tokens - 2]", param="--migrate-after")
    from services.launcher import LocalCluster

    with LocalCluster([_model_dir()], num_workers=2, extra_env={"C2C_PREWARM_INTERVAL_S": "0"}) as cluster:
        rows = asyncio.run(_measure(cluster, contexts, paths, args))
    result = {"command": command_line("migrate"), "model": "llama small (synthetic, window 16k), fp32 KV",
              "rows": rows}
    text = json.dumps(result, indent=1) + "\n"
    if args.json:
        publish(text, args.out)
    else:
        print(_table(rows), end="")
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


def _model_dir() -> Path:
    """The small synthetic llama with its window widened to 16k tokens (RoPE needs no more)."""
    config_path = MODEL_DIR / "config.json"
    if not config_path.is_file():
        from worker.synth import synth_model

        synth_model("llama", "small", MODEL_DIR, seed=5)
        config = json.loads(config_path.read_text())
        config["max_position_embeddings"] = WINDOW_TOKENS
        config_path.write_text(json.dumps(config, indent=2))
    return MODEL_DIR


class _Client:
    """A gateway of its own: submits straight to a worker and reads each request's chunks."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.gateway_id = f"benchmig{uuid.uuid4().hex[:6]}"
        self.queues: dict[str, asyncio.Queue] = {}

    async def start(self) -> _Client:
        import nats
        from redis.asyncio import Redis

        from services import keys, schemas, subjects
        from services.schemas import TokenChunk

        self.nc = await nats.connect(self.cluster.nats_url, max_reconnect_attempts=0)
        self.redis = Redis.from_url(self.cluster.redis_url)
        await self.redis.set(keys.gateway(self.gateway_id), "1", ex=int(WAIT_S) * 10)  # not an orphan

        async def on_chunk(msg):
            chunk = schemas.decode(TokenChunk, msg.data)
            queue = self.queues.get(chunk.request_id)
            if queue is not None and not chunk.accepted:
                queue.put_nowait((time.perf_counter(), chunk))

        await self.nc.subscribe(subjects.gateway_inbox_all(self.gateway_id), cb=on_chunk)
        await self.nc.flush()
        return self

    async def close(self) -> None:
        await self.redis.aclose()
        await self.nc.close()

    async def submit(self, worker_id: str, **fields) -> tuple[str, asyncio.Queue]:
        from services import schemas, subjects
        from services.schemas import SubmitRequest

        request_id = f"mig-{uuid.uuid4().hex[:10]}"
        self.queues[request_id] = queue = asyncio.Queue()
        req = SubmitRequest(request_id=request_id, model_id=MODEL_DIR.name, temperature=0.0, ignore_eos=True,
                            epoch=1, arrival_s=time.time(), **fields)
        inbox = subjects.gateway_inbox(self.gateway_id, request_id)
        await self.nc.publish(subjects.worker_submit(worker_id), schemas.encode(req), reply=inbox)
        return request_id, queue

    async def migrate(self, worker_id: str, request_id: str, target_id: str, transport: str):
        from services import schemas, subjects
        from services.schemas import MigrateCommand, MigrationResult

        msg = await self.nc.request(subjects.worker_migrate(worker_id), schemas.encode(
            MigrateCommand(request_id, target_id, transport)), timeout=WAIT_S)
        return schemas.decode(MigrationResult, msg.data)


async def _read(queue: asyncio.Queue, on_tokens=None) -> list[tuple[float, object]]:
    """Every chunk of a request to its final one: (arrival time, chunk)."""
    chunks = []
    async with asyncio.timeout(WAIT_S):
        while True:
            arrived_s, chunk = await queue.get()
            if chunk.error:
                raise RuntimeError(f"request failed: {chunk.error}")
            chunks.append((arrived_s, chunk))
            if on_tokens is not None:
                await on_tokens(chunks)
            if chunk.is_final:
                return chunks


def _tokens(chunks) -> list[int]:
    return [t for _, c in chunks for t in c.token_ids]


async def _measure(cluster, contexts: list[int], paths: list[str], args) -> list[dict]:
    client = await _Client(cluster).start()
    source, target = cluster.worker_ids
    rng = random.Random(0)
    rows = []
    try:
        warmup = [rng.randrange(10, 2000) for _ in range(600)]  # kernels and prefill autotune, on both
        for worker_id in (source, target):
            await _read((await client.submit(worker_id, prompt_token_ids=warmup, max_tokens=2))[1])
        for num_context in contexts:
            prompt = [rng.randrange(10, 2000) for _ in range(num_context)]
            reference = _tokens(await _read((await client.submit(source, prompt_token_ids=prompt,
                                                                 max_tokens=args.max_tokens))[1]))
            start_s = time.perf_counter()  # what a re-dispatch prefills: the prompt and the tokens so far
            _, queue = await client.submit(target, prompt_token_ids=prompt + reference[:args.migrate_after],
                                           max_tokens=1)
            reprefill_ms = ((await _read(queue))[0][0] - start_s) * 1e3
            for path in paths:
                runs = [await _migrated_run(client, source, target, prompt, path, args) for _ in range(args.repeats)]
                row = {"path": path, "context_tokens": num_context}
                for name in ("downtime_ms", "total_ms", "stop_ms_at_source", "itl_ms"):
                    row[name] = round(statistics.median(r[name] for r in runs), 2)
                row["phases_ms"] = {name: round(statistics.median(r["phases_ms"][name] for r in runs), 2)
                                    for name in runs[0]["phases_ms"]}
                row.update(downtimes_ms=[round(r["downtime_ms"], 2) for r in runs], reprefill_ms=round(reprefill_ms, 2),
                           output_matches=all(r["tokens"] == reference for r in runs))
                rows.append(row)
                print(f"  {path} {num_context}: {row}", flush=True)
    finally:
        await client.close()
    return rows


async def _migrated_run(client, source: str, target: str, prompt: list[int], path: str, args) -> dict:
    request_id, queue = await client.submit(source, prompt_token_ids=prompt, max_tokens=args.max_tokens)
    command = {}

    async def move_once(chunks) -> None:
        if not command and len(_tokens(chunks)) >= args.migrate_after:
            command["sent_s"] = time.perf_counter()
            command["task"] = asyncio.create_task(client.migrate(source, request_id, target, path))

    chunks = await _read(queue, move_once)
    result = await command["task"]
    if not result.is_moved:
        raise RuntimeError(f"{path}: not moved: {result.error}")
    first_moved = next(i for i, (_, c) in enumerate(chunks) if c.worker_id == target)
    gaps_ms = [(b[0] - a[0]) * 1e3 for a, b in zip(chunks, chunks[1:], strict=False)]
    return {"downtime_ms": gaps_ms[first_moved - 1], "total_ms": (chunks[first_moved][0] - command["sent_s"]) * 1e3,
            "stop_ms_at_source": result.stop_ms, "phases_ms": result.phases_ms,
            "itl_ms": statistics.median(g for i, g in enumerate(gaps_ms) if i != first_moved - 1),
            "tokens": _tokens(chunks)}


def _table(rows: list[dict]) -> str:
    lines = [f"{'path':<5} {'context':>7} {'downtime ms':>11} {'total ms':>9} {'itl ms':>7} {'reprefill ms':>12} "
             f"{'reprefill/downtime':>18} {'exact':>5}"]
    for r in rows:
        ratio = r["reprefill_ms"] / r["downtime_ms"] if r["downtime_ms"] > 0 else float("inf")
        lines.append(f"{r['path']:<5} {r['context_tokens']:>7} {r['downtime_ms']:>11.1f} {r['total_ms']:>9.1f} "
                     f"{r['itl_ms']:>7.1f} {r['reprefill_ms']:>12.1f} {ratio:>18.1f} {str(r['output_matches']):>5}")
    return "\n".join(lines) + "\n"
