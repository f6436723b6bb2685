"""`c2cserve bench faults`: kill -9 and SIGSTOP/SIGCONT each process in turn under load.

A supervised LocalCluster (embedded NATS + Valkey, gateway, placer, controller, two CPU
workers, one tiny model) serves a bounded load of greedy streaming requests whose
answers are known (the engine's own output, computed first). For each fault the load
runs, the fault is injected (SIGKILL, or SIGSTOP for `--pause-s` then SIGCONT), and the
load goes on until a request that started after the fault has succeeded, plus a little.

Per fault it prints: requests, exact answers, failures (with the slowest failure: a
failure must be fast and clear), wrong answers (200 with other text: lost, foreign or
repeated tokens), duplicated answers (longer than the right one), and the recovery time
(fault -> first success of a request started after it), and for a kill, when the
supervisor had the process running again. Targets: 0 wrong, 0 duplicated,
recovery within 10 s without a hand. Writes bench/results/faults.txt (and --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.output import command_line, publish

RESULTS = Path(__file__).resolve().parent / "results" / "faults.txt"
MODEL_DIR = Path("~/.cache/c2cserve/bench/faults-llama").expanduser()
PROMPTS = ["The quick brown fox", "Hello, world", "One two three", "Lorem ipsum dolor", "Seven ravens"]
TARGETS = ("worker", "placer", "controller", "gateway", "nats-server", "valkey-server")
RECOVERY_TARGET_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets", default=",".join(TARGETS), help="processes to fault, in order")
    parser.add_argument("--faults", default="kill,pause", help="kill (SIGKILL) and/or pause (SIGSTOP/SIGCONT)")
    parser.add_argument("--pause-s", type=float, default=4.0, help="SIGSTOP length (default 4 s: past the expiry)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (default 48)")
    parser.add_argument("--settle-s", type=float, default=3.0, help="load after recovery (default 3 s)")
    parser.add_argument("--ceiling-s", type=float, default=90.0, help="give a fault up after this (default 90 s)")
    parser.add_argument("--json", action="store_true", help="also print the rows as one JSON object")
    parser.add_argument("--out", default=str(RESULTS), help="results file")


@dataclass
class Outcome:
    started_s: float
    ended_s: float
    status: str  # ok | failed | wrong | duplicated
    detail: str = ""


@dataclass
class Row:
    fault: str
    num_requests: int = 0
    num_ok: int = 0
    num_failed: int = 0
    num_wrong: int = 0
    num_duplicated: int = 0
    slowest_failure_s: float = 0.0
    recovery_s: float | None = None
    restarted_s: float | None = None  # kill: the supervisor had a new process running after this
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def is_met(self) -> bool:
        is_back = not self.fault.startswith("kill") or (
            self.restarted_s is not None and self.restarted_s <= RECOVERY_TARGET_S)
        return (self.num_wrong == 0 and self.num_duplicated == 0 and self.recovery_s is not None
                and self.recovery_s <= RECOVERY_TARGET_S and is_back)


def _model_dir() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        from worker.synth import synth_model

        synth_model("llama", "tiny", MODEL_DIR, seed=11)
    return MODEL_DIR


def _expected(model_dir: Path, max_tokens: int) -> dict[str, str]:
    from worker.engine import Engine, SamplingParams

    engine = Engine()
    engine.add_model(model_dir.name, model_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return {p: engine.generate(model_dir.name, p, params).new_text for p in PROMPTS}


def find_process(target: str, worker_id: str = "") -> psutil.Process:
    """The live process of a service of this cluster (for "worker": that worker id, or
    the first worker)."""
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if _is_target(cmdline, target) and proc.status() != psutil.STATUS_ZOMBIE \
                and (not worker_id or _worker_id_of(cmdline) == worker_id):
            return proc
    raise RuntimeError(f"no running {target} process")


def _worker_id_of(cmdline: list[str]) -> str:
    return cmdline[cmdline.index("--worker-id") + 1] if "--worker-id" in cmdline else ""


def _is_target(cmdline: list[str], target: str) -> bool:
    if target in ("nats-server", "valkey-server"):
        return bool(cmdline) and Path(cmdline[0].split()[0]).name == target
    if "services.cli" not in cmdline:
        return False
    command = cmdline[cmdline.index("services.cli") + 1]
    return command == target and (target != "worker" or cmdline[-1] != "--slice-index")


class Load:
    """Greedy streaming requests with known answers, `concurrency` at a time."""

    def __init__(self, url: str, model_id: str, expected: dict[str, str], args: argparse.Namespace):
        self.url, self.model_id, self.expected, self.args = url, model_id, expected, args
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._count = 0

    async def run_until_stopped(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*[self._client(session) for _ in range(self.args.concurrency)])

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, session) -> None:
        while not self._stop.is_set():
            self._count += 1
            prompt = PROMPTS[self._count % len(PROMPTS)]
            started = time.monotonic()
            status, detail = await self._one(session, prompt)
            self.outcomes.append(Outcome(started, time.monotonic(), status, detail))
            if status == "failed":
                await asyncio.sleep(0.05)  # a client's retry pause: do not spin on a refusing server

    async def _one(self, session, prompt: str) -> tuple[str, str]:
        import aiohttp

        body = {"model": self.model_id, "prompt": prompt, "max_tokens": self.args.max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": True}
        try:
            async with session.post(f"{self.url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    return "failed", f"HTTP {resp.status}: {(await resp.json()).get('error', {}).get('message', '')[:50]}"
                text, error = await _read_stream(resp)
        except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
            return "failed", f"{type(exc).__name__}"
        if error:
            return "failed", f"stream error: {error[:50]}"
        return _judge(text, self.expected[prompt]), ""


async def _read_stream(resp) -> tuple[str, str]:
    texts, error = [], ""
    async for raw in resp.content:
        line = raw.decode(errors="replace").strip()
        if line.startswith("data: {"):
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"].get("message", "error")
            elif event.get("choices"):
                texts.append(event["choices"][0].get("text") or "")
    return "".join(texts), error


def _judge(text: str, expected: str) -> str:
    if text == expected:
        return "ok"
    return "duplicated" if len(text) > len(expected) else "wrong"


def row_of(fault: str, outcomes: list[Outcome], fault_s: float) -> Row:
    row = Row(fault, num_requests=len(outcomes))
    for o in outcomes:
        setattr(row, f"num_{o.status}", getattr(row, f"num_{o.status}") + 1)
        if o.status == "failed":
            row.slowest_failure_s = max(row.slowest_failure_s, o.ended_s - o.started_s)
            row.errors[o.detail] = row.errors.get(o.detail, 0) + 1
    recovered = [o.ended_s for o in outcomes if o.status == "ok" and o.started_s >= fault_s]
    row.recovery_s = (min(recovered) - fault_s) if recovered else None
    return row


async def run_fault(load: Load, target: str, fault: str, args: argparse.Namespace) -> Row:
    """Warm load, the fault, then load until recovered (+ settle) or the ceiling."""
    runner = asyncio.ensure_future(load.run_until_stopped())
    await asyncio.sleep(2.0)  # the load is flowing before the fault
    fault_s = time.monotonic()
    old_pid, worker_id = await asyncio.to_thread(_inject, target, fault, args.pause_s)
    deadline, restarted_s = fault_s + args.ceiling_s, None
    while time.monotonic() < deadline:
        if fault == "kill" and restarted_s is None and _has_new_process(target, worker_id, old_pid):
            restarted_s = time.monotonic() - fault_s
        row = row_of(f"{fault} {target}", load.outcomes, fault_s)
        is_back = fault != "kill" or restarted_s is not None
        if is_back and row.recovery_s is not None and time.monotonic() > fault_s + row.recovery_s + args.settle_s:
            break
        await asyncio.sleep(0.2)
    load.stop()
    await runner
    row = row_of(f"{fault} {target}", load.outcomes, fault_s)
    row.restarted_s = restarted_s
    return row


def _has_new_process(target: str, worker_id: str, old_pid: int) -> bool:
    try:
        return find_process(target, worker_id).pid != old_pid
    except RuntimeError:
        return False


def _inject(target: str, fault: str, pause_s: float) -> tuple[int, str]:
    """The fault on the target's process; returns its pid and worker id (workers)."""
    proc = find_process(target)
    identity = (proc.pid, _worker_id_of(proc.cmdline()))
    if fault == "kill":
        os.kill(proc.pid, signal.SIGKILL)
        return identity
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(pause_s)
    os.kill(proc.pid, signal.SIGCONT)
    return identity


def _table(rows: list[Row]) -> str:
    lines = [f"{'fault':<22}{'requests':>9}{'exact':>7}{'failed':>8}{'wrong':>7}{'dup':>5}"
             f"{'slowest fail s':>16}{'recovery s':>12}{'restarted s':>13}  target met"]
    for r in rows:
        recovery = f"{r.recovery_s:.2f}" if r.recovery_s is not None else "never"
        restarted = "-" if not r.fault.startswith("kill") else f"{r.restarted_s:.2f}" if r.restarted_s else "never"
        lines.append(f"{r.fault:<22}{r.num_requests:>9}{r.num_ok:>7}{r.num_failed:>8}{r.num_wrong:>7}"
                     f"{r.num_duplicated:>5}{r.slowest_failure_s:>16.2f}{recovery:>12}{restarted:>13}  "
                     f"{'yes' if r.is_met else 'NO'}")
    return "\n".join(lines) + "\n"


async def _all_faults(url: str, model_id: str, expected: dict[str, str], args: argparse.Namespace) -> list[Row]:
    rows = []
    for target in args.targets.split(","):
        for fault in args.faults.split(","):
            load = Load(url, model_id, expected, args)
            rows.append(await run_fault(load, target, fault, args))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    from services.launcher import LocalCluster

    model_dir = _model_dir()
    expected = _expected(model_dir, args.max_tokens)
    with LocalCluster([model_dir], num_workers=2, supervise=True) as cluster:
        rows = asyncio.run(_all_faults(cluster.url, model_dir.name, expected, args))
    report = [f"$ {command_line('faults')}",
              f"model: {model_dir.name} (tiny, greedy, {args.max_tokens} tokens, streamed); 2 CPU workers, "
              f"{args.concurrency} requests in flight; SIGSTOP lasts {args.pause_s:.0f} s; "
              f"machine: {psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
              _table(rows)]
    report += [f"  {r.fault}: " + "; ".join(f"{n}x {e}" for e, n in sorted(r.errors.items())) for r in rows if r.errors]
    report.append(f"targets: 0 wrong, 0 duplicated, recovery <= {RECOVERY_TARGET_S:.0f} s: "
                  + ("met for every fault" if all(r.is_met for r in rows) else "NOT met for "
                     + ", ".join(r.fault for r in rows if not r.is_met)) + "\n")
    publish("\n".join(report), args.out)
    if args.json:
        print(json.dumps({"rows": [asdict(r) | {"is_met": r.is_met} for r in rows]}))
    return 0
