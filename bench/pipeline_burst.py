"""`c2cserve bench pipeline-burst`: a burst on one model, pinned whole to one CPU slice vs
spread by the pipeline policy (placer/pipeline_policy.py) over an idle second slice.

Two CPU slices: the driver (this process, the first core) and a stage server process
(the second core). `--requests` requests of `--prompt-tokens` tokens arrive at once.
Pinned: the model runs whole on the driver; the other slice stays idle. Policy: every
`--period-s` the policy sees the driver's live backlog and the idle slice and may change
the pipeline online (Engine.reconfigure). Rounds alternate the two modes; prints TTFT
p50/p99 of each mode (the best round) and whether their outputs are equal.

On two cores the gain is bounded: a step of 2 stages and m micro-batches takes at best
(m + 1) / 2m of one slice's time (1.6x faster at m = 4), before the hops' cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from bench.output import command_line, publish
from bench.reconfig import beside_stage_server, model_dir_of, pinned_engine

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_burst.txt"
STAGE_ID = "bench-burst"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="qwen2", help="synth model family (default qwen2)")
    parser.add_argument("--preset", default="small", help="synth model sizes (default small)")
    parser.add_argument("--requests", type=int, default=24, help="requests in the burst (default 24)")
    parser.add_argument("--prompt-tokens", type=int, default=400, help="prompt tokens each (default 400)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated each (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both modes, alternated (default 2)")
    parser.add_argument("--period-s", type=float, default=0.05, help="policy period (default 0.05)")
    parser.add_argument("--out", default=str(RESULTS), help="results file (a .json beside it too)")


def burst(engine, prompts: list[list[int]], max_tokens: int, policy_step=None) -> tuple[list[float], dict]:
    """All prompts at once; returns each request's TTFT (s) and its tokens."""
    from worker.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start_s = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"b{i}", "m", prompt_token_ids=ids, params=params)
    first_s, tokens, next_policy_s = {}, {f"b{i}": [] for i in range(len(prompts))}, start_s
    while engine.has_work():
        if policy_step is not None and time.perf_counter() >= next_policy_s:
            policy_step(time.perf_counter() - start_s)
            next_policy_s = time.perf_counter() + policy_step.period_s
        for out in engine.step():
            first_s.setdefault(out.request_id, time.perf_counter())
            tokens[out.request_id] += out.new_token_ids
    return [first_s[r] - start_s for r in tokens], tokens


class PolicyStep:
    """One policy decision on the live engine: plan_pipeline, then reconfigure when it changed."""

    def __init__(self, engine, nats_url: str, speed: float, period_s: float, cooldown_s: float):
        from placer.pipeline_policy import PipelinePolicy, whole

        self.engine, self.nats_url, self.speed, self.period_s = engine, nats_url, speed, period_s
        self.num_layers = engine.runner.slots["m"].config.num_layers
        self.plan, self.changed_s, self.changes = whole("driver", self.num_layers), -1e9, []
        self.policy = PipelinePolicy(cooldown_s=cooldown_s)
        self.rates: dict[int, float] = {}   # stages -> measured prefill tokens/s
        self._since: tuple[float, int] | None = None

    def __call__(self, now_s: float) -> None:
        from placer.pipeline_policy import plan_pipeline
        from services.schemas import WorkerState
        from worker.pipeline import StageSpec

        if self.engine.is_reconfiguring("m"):
            self._since = None
            return
        stats = self.engine.stats()
        if self._since is None:
            self._since = (now_s, stats.num_prefill_tokens)
        elif stats.num_prefill_tokens > self._since[1]:
            self.rates[self.plan.num_stages] = (stats.num_prefill_tokens - self._since[1]) / (now_s - self._since[0])
        driver = WorkerState("driver", num_running=stats.num_running, num_waiting=stats.num_waiting,
                             queued_prefill_tokens=stats.num_queued_prefill_tokens, prefill_tokens_per_s=self.speed)
        others = [WorkerState(STAGE_ID, prefill_tokens_per_s=self.speed)]
        plan = plan_pipeline(self.num_layers, driver, others, self.plan, now_s, self.changed_s, self.policy,
                             self.rates)
        if plan != self.plan:
            specs = [StageSpec(a, b, "driver") if s == "driver" else StageSpec(a, b, "remote", s)
                     for s, (a, b) in zip(plan.slice_ids, plan.layer_ranges, strict=True)]
            self.engine.reconfigure("m", specs, self.nats_url)
            self.plan, self.changed_s = plan, now_s
            self.changes.append((round(now_s, 3), plan.num_stages))


_PROBE = """
import os, sys, time, torch
os.sched_setaffinity(0, {int(sys.argv[1])}); torch.set_num_threads(1)
a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
a @ b
start_s, n = time.perf_counter(), 0
while time.perf_counter() - start_s < 2.0:
    a @ b; n += 1
print(n * 2 * 512 * 1024 * 1024 / (time.perf_counter() - start_s) / 1e9)
"""


def two_core_scaling(cores: list[int]) -> dict:
    """GEMM GFLOP/s of one process alone on the first core, then of one per core at once:
    the most any spread over these two slices can gain (1.0: none, 2.0: perfect)."""
    import subprocess
    import sys

    def gflops(on: list[int]) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE, str(c)], stdout=subprocess.PIPE, text=True)
                 for c in on]
        return [float(p.communicate()[0]) for p in procs]

    alone = gflops(cores[:1])[0]
    both = gflops(cores[:2])
    return {"alone_gflops": round(alone, 1), "concurrent_gflops": [round(g, 1) for g in both],
            "scaling": round(sum(both) / alone, 2)}


def _prefill_speed(engine, prompt: list[int]) -> float:
    """Prefill tokens/s of the driver slice, one prompt alone (the policy's slice speed)."""
    from worker.engine import SamplingParams

    start_s = time.perf_counter()
    engine.generate("m", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return len(prompt) / (time.perf_counter() - start_s)


def run(args: argparse.Namespace) -> int:
    model_dir = model_dir_of(args.arch, args.preset)
    cores = sorted(os.sched_getaffinity(0))
    scaling = two_core_scaling(cores) if len(cores) > 1 else None
    report = beside_stage_server(STAGE_ID, lambda nats_url, core: _measure(args, model_dir, nats_url, core))
    report["command"], report["two_core_scaling"] = command_line("pipeline-burst"), scaling
    report["simulated"] = simulated()
    Path(args.out).with_suffix(".json").parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    publish(_text(report), args.out)
    return 0


def _measure(args, model_dir: Path, nats_url: str, core: int) -> dict:
    engine = pinned_engine(model_dir, core)
    vocab = engine.runner.slots["m"].config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, min(vocab, 8000)) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    speed = statistics.median(_prefill_speed(engine, prompts[0]) for _ in range(3))
    results: dict[str, list] = {"pinned": [], "policy": []}
    outputs = {}
    for _ in range(args.rounds):
        for mode in ("pinned", "policy"):
            step = PolicyStep(engine, nats_url, speed, args.period_s, cooldown_s=1.0) if mode == "policy" else None
            ttfts, outputs[mode] = burst(engine, prompts, args.max_tokens, step)
            engine.close_pipelines()
            results[mode].append({"ttft_p50_ms": 1e3 * _quantile(ttfts, 0.5), "ttft_p99_ms": 1e3 * _quantile(ttfts, 0.99),
                                  "changes": step.changes if step else [],
                                  "rates": {n: round(r) for n, r in step.rates.items()} if step else {}})
    best = {mode: min(rows, key=lambda r: r["ttft_p99_ms"]) for mode, rows in results.items()}
    return {"model": f"{args.arch}/{args.preset}", "requests": args.requests, "prompt_tokens": args.prompt_tokens,
            "slice_prefill_tokens_per_s": round(speed), "rounds": results, "best": best,
            "p99_gain": best["pinned"]["ttft_p99_ms"] / best["policy"]["ttft_p99_ms"],
            "outputs_equal": outputs["pinned"] == outputs["policy"], "load_average_1m": os.getloadavg()[0]}


SIM_BURSTS = (("dense-1b", "1g.12gb", 64), ("dense-8b", "1g.12gb", 64), ("dense-13b", "1g.12gb", 64),
              ("moe-8x7b", "2g.24gb", 32), ("dense-70b", "2g.24gb", 32))


def simulated() -> list[dict]:
    """The same comparison in the simulator at cluster scale (sim/pipeline_burst.py)."""
    from sim.pipeline_burst import BurstConfig, compare

    rows = []
    for family, profile, num_requests in SIM_BURSTS:
        r = compare(BurstConfig(family=family, profile=profile, num_requests=num_requests))
        rows.append({"family": family, "profile": profile, "requests": num_requests,
                     "pinned_p99_s": round(r["pinned"]["ttft_p99_s"], 2), "policy_p99_s": round(r["policy"]["ttft_p99_s"], 2),
                     "p99_gain": round(r["p99_gain"], 2), "max_stages": max([1] + [n for _, n in r["policy"]["changes"]])})
    return rows


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _text(report: dict) -> str:
    lines = [report["command"], "",
             f"model {report['model']}: {report['requests']} requests x {report['prompt_tokens']} prompt tokens at "
             f"once; one slice prefills {report['slice_prefill_tokens_per_s']} tokens/s; "
             f"load average {report['load_average_1m']:.2f}",
             f"two-slice compute scaling (GEMM, one process per core at once vs one alone): "
             f"{report['two_core_scaling']}", ""]
    for mode, rows in report["rounds"].items():
        for i, r in enumerate(rows):
            lines.append(f"{mode:7s} round {i}: TTFT p50 {r['ttft_p50_ms']:.0f} ms, p99 {r['ttft_p99_ms']:.0f} ms"
                         + (f", pipeline changes (s, stages) {r['changes']}, measured prefill tokens/s by "
                            f"stages {r['rates']}" if r["changes"] else ""))
    lines += ["", f"TTFT p99, best round: pinned {report['best']['pinned']['ttft_p99_ms']:.0f} ms, policy "
              f"{report['best']['policy']['ttft_p99_ms']:.0f} ms: {report['p99_gain']:.2f}x; "
              f"outputs equal: {report['outputs_equal']}", "",
              "simulated cluster (sim/pipeline_burst.py; up to 7 idle slices on other GPUs, requests x 1024 "
              "prompt tokens at once, 32 output tokens):"]
    for r in report["simulated"]:
        lines.append(f"  {r['family']:10s} on {r['profile']}, {r['requests']} requests: TTFT p99 pinned "
                     f"{r['pinned_p99_s']} s, policy {r['policy_p99_s']} s: {r['p99_gain']}x (up to {r['max_stages']} stages)")
    return "\n".join(lines) + "\n"
