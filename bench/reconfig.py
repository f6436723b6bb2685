"""`c2cserve bench reconfig`: switch a running model between 1 and 2 pipeline stages.

One run: a closed-loop load (`--streams` clients, each sending its next request a
random 0..0.2 s after the last one ends) while the model switches 1 -> 2 -> 1 stages online, `--cycles` times,
`--phase-s` apart. 1 stage: the model whole on the driver (one core); 2 stages: layers
split between the driver and a stage server process on the other core, over NATS.

Per switch: `downtime_ms`, the longest gap in any client's token stream that overlaps
the switch (from the reconfigure call until the new pipeline runs); `ttft_overhead` and
`tpot_overhead`, the TTFT of requests whose first token came, and the inter-token gaps
that ended, from the call to `--settle-s` after the switch, against the steady values of
the configuration each ran on, measured in the same run just before the call (the old
one) and just after the window (the new one), so a shared machine's drifts cancel
(fractions: 0.1 = 10% slower); `output_matches`, every request of the run equal to its
greedy answer alone (unreconfigured). `--json` prints one JSON object, a row per switch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.output import command_line, publish

RESULTS = Path(__file__).resolve().parent / "results" / "reconfig.txt"
PROMPTS = [f"stream {i}: the quick brown fox jumps over the lazy dog {' '.join(['again'] * (i % 5))}"
           for i in range(16)]
STAGE_ID = "bench-reconfig"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="qwen2", help="synth model family (default qwen2)")
    parser.add_argument("--preset", default="small", help="synth model sizes (default small: 4 layers)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument("--phase-s", type=float, default=4.0, help="seconds between switches (default 4)")
    parser.add_argument("--cycles", type=int, default=2, help="1 -> 2 -> 1 stage cycles (default 2)")
    parser.add_argument("--settle-s", type=float, default=0.5, help="after a switch, still its window (default 0.5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with a row per switch")
    parser.add_argument("--out", default=str(RESULTS), help="results file (text; the JSON one .json beside it)")


@dataclass
class Stream:
    prompt: str
    sent_s: float
    token_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class Switch:
    from_stages: int
    to_stages: int
    called_s: float
    done_s: float = 0.0
    tail_blocks: int = 0
    num_rounds: int = 0
    pause_ms: float = 0.0


def drive(engine, num_streams: int, max_tokens: int, duration_s: float, plan=(),
          nats_url: str | None = None, think_s: float = 0.2) -> tuple[list[Stream], list[Switch]]:
    """Closed-loop load for duration_s, each client waiting a random 0..think_s between its
    requests (clients in lockstep would make a window's TTFTs depend on its phase);
    plan: [(at_s, specs)] reconfigurations."""
    import random

    from worker.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    start_s, streams, live, switches, pending = time.perf_counter(), [], {}, [], list(plan)
    due = sorted((start_s + i * think_s / num_streams, i) for i in range(num_streams))  # (send at, client)
    counter = iter(range(1 << 30))

    def send(client: int) -> None:
        n = next(counter)
        stream = Stream(PROMPTS[n % len(PROMPTS)], time.perf_counter())
        engine.add_request(f"c{client}-{n}", "m", prompt=stream.prompt, params=params)
        live[f"c{client}-{n}"] = (client, stream)
        streams.append(stream)

    while live or due:
        while due and time.perf_counter() >= due[0][0]:
            send(due.pop(0)[1])
        now_s = time.perf_counter() - start_s
        if pending and now_s >= pending[0][0]:
            specs = pending.pop(0)[1]
            switch = engine.reconfigure("m", specs, nats_url)
            switches.append((switch, Switch(_num_stages(engine), len(specs), time.perf_counter())))
        if not engine.has_work() and not engine.is_reconfiguring("m"):
            time.sleep(0.0005)  # between requests: leave the core to others
        for out in engine.step():
            client, stream = live[out.request_id]
            stream.token_s += [time.perf_counter()] * len(out.new_token_ids)
            stream.tokens += out.new_token_ids
            if out.finished:
                del live[out.request_id]
                if time.perf_counter() - start_s < duration_s:
                    due = sorted(due + [(time.perf_counter() + rng.uniform(0, think_s), client)])
        for switch, record in switches:
            if not record.done_s and not engine.is_reconfiguring("m"):
                record.done_s, record.tail_blocks, record.num_rounds, record.pause_ms = (
                    time.perf_counter(), switch.tail_blocks, switch.num_rounds, 1e3 * switch.pause_s)
    return streams, [record for _, record in switches]


def _num_stages(engine) -> int:
    pipeline = engine.runner.slots["m"].pipeline
    return 1 if pipeline is None else len(pipeline.stages)


def config_at(t_s: float, first_stages: int, switches: list[Switch]) -> int:
    stages = first_stages
    for switch in switches:
        if switch.done_s and switch.done_s <= t_s:
            stages = switch.to_stages
    return stages


def steady_outside(streams: list[Stream], switches: list[Switch], settle_s: float, warmup_s: float) -> dict:
    """Per configuration (stages): mean TTFT, mean inter-token gap and longest gap (ms), of
    what ran outside every switch's window and after warmup_s (the clients' first
    requests all come at once)."""
    windows = [(s.called_s - settle_s, s.done_s + settle_s) for s in switches]
    begin_s = min(s.sent_s for s in streams) + warmup_s
    outside = lambda t: t >= begin_s and not any(a <= t <= b for a, b in windows)  # noqa: E731
    first = switches[0].from_stages
    gaps: dict[int, list[float]] = {}
    ttfts: dict[int, list[float]] = {}
    for s in streams:
        for a, b in zip(s.token_s, s.token_s[1:], strict=False):
            if outside(a) and outside(b):
                gaps.setdefault(config_at(b, first, switches), []).append(b - a)
        if s.token_s and outside(s.sent_s) and outside(s.token_s[0]):
            ttfts.setdefault(config_at(s.token_s[0], first, switches), []).append(s.token_s[0] - s.sent_s)
    return {stages: {"ttft_ms": 1e3 * statistics.fmean(ttfts[stages]), "tpot_ms": 1e3 * statistics.fmean(g),
                     "max_gap_ms": 1e3 * max(g), "num_requests": len(ttfts[stages])}
            for stages, g in sorted(gaps.items())}


def local_steady(streams: list[Stream], t0_s: float, t1_s: float) -> tuple[float, float, float]:
    """(mean TTFT, mean inter-token gap, longest gap) in seconds of what happened in [t0_s, t1_s)."""
    gaps = [b - a for s in streams for a, b in zip(s.token_s, s.token_s[1:], strict=False) if t0_s <= b < t1_s]
    ttfts = [s.token_s[0] - s.sent_s for s in streams if s.token_s and t0_s <= s.token_s[0] < t1_s]
    return (statistics.fmean(ttfts) if ttfts else math.nan, statistics.fmean(gaps) if gaps else math.nan,
            max(gaps, default=math.nan))


def switch_row(switch: Switch, streams: list[Stream], settle_s: float, baseline_s: float,
               reference: dict[str, list[int]]) -> dict:
    """One switch's downtime and overheads (see the module docstring); the steady values
    are those of the same run just before the call (the old configuration) and just
    after the window (the new one), `baseline_s` each: slow drifts of a shared machine cancel."""
    end_s = switch.done_s + settle_s
    before = local_steady(streams, switch.called_s - baseline_s, switch.called_s)
    after = local_steady(streams, end_s, end_s + baseline_s)
    base_at = lambda t: after if t > switch.done_s else before  # noqa: E731
    downtime_s, gap_sum, gap_base, ttft_sum, ttft_base = 0.0, 0.0, 0.0, 0.0, 0.0
    for s in streams:
        for a, b in zip(s.token_s, s.token_s[1:], strict=False):
            if b >= switch.called_s and a <= switch.done_s:
                downtime_s = max(downtime_s, b - a)
            if switch.called_s <= b <= end_s:
                gap_sum, gap_base = gap_sum + b - a, gap_base + base_at(b)[1]
        if s.token_s and switch.called_s <= s.token_s[0] <= end_s:
            ttft_sum, ttft_base = ttft_sum + s.token_s[0] - s.sent_s, ttft_base + base_at(s.token_s[0])[0]
    return {"from_stages": switch.from_stages, "to_stages": switch.to_stages,
            "downtime_ms": round(downtime_s * 1e3, 2),
            "steady_max_gap_ms": round(1e3 * max(before[2], after[2]), 2),  # the same, before and after
            "ttft_overhead": _overhead(ttft_sum, ttft_base), "tpot_overhead": _overhead(gap_sum, gap_base),
            "output_matches": all(s.tokens == reference[s.prompt] for s in streams),
            "switch_ms": round((switch.done_s - switch.called_s) * 1e3, 1),
            "pause_ms": round(switch.pause_ms, 2), "tail_blocks": switch.tail_blocks,
            "copy_rounds": switch.num_rounds}


def summary(rows: list[dict]) -> dict:
    """Worst downtime, mean overheads over the switches, all outputs exact."""
    mean = lambda key: round(statistics.fmean(r[key] for r in rows if r[key] is not None), 4)  # noqa: E731
    return {"max_downtime_ms": max(r["downtime_ms"] for r in rows), "mean_ttft_overhead": mean("ttft_overhead"),
            "mean_tpot_overhead": mean("tpot_overhead"), "max_pause_ms": max(r["pause_ms"] for r in rows),
            "all_outputs_match": all(r["output_matches"] for r in rows)}


def _overhead(measured: float, baseline: float) -> float | None:
    return round(measured / baseline - 1, 4) if baseline > 0 and not math.isnan(baseline) else None


def model_dir_of(arch: str, preset: str) -> Path:
    """A synth checkpoint of the bench's own (made once, cached)."""
    path = Path(f"~/.cache/c2cserve/bench/reconfig-{arch}-{preset}").expanduser()
    if not (path / "config.json").is_file():
        from worker.synth import synth_model

        synth_model(arch, preset, path)
    return path


def beside_stage_server(stage_id: str, measure):
    """measure(nats_url, core) on this process's first core, over embedded NATS, with a stage
    server `stage_id` on the second core (the same core when there is one)."""
    from services.embedded import EmbeddedServers
    from worker.stage_server import spawn

    cores = sorted(os.sched_getaffinity(0))
    with EmbeddedServers() as servers:
        proc = spawn(servers.nats_url, stage_id, cores[1] if len(cores) > 1 else None)
        try:
            return measure(servers.nats_url, cores[0])
        finally:
            proc.terminate()
            proc.wait(30)


def pinned_engine(model_dir: Path, core: int):
    """One engine thread on `core` serving the model as "m", loaded and warmed up."""
    from worker.engine import Engine, EngineConfig

    os.sched_setaffinity(0, {core})
    engine = Engine(EngineConfig(num_threads=1))
    engine.add_model("m", model_dir, preload=True)
    engine.warmup()
    return engine


def run(args: argparse.Namespace) -> int:
    model_dir = model_dir_of(args.arch, args.preset)
    report = beside_stage_server(STAGE_ID, lambda nats_url, core: _measure(args, model_dir, nats_url, core))
    report = {"command": command_line("reconfig"), **report}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:  # stdout: the one JSON object; the text report goes to the file only
        print(json.dumps(report))
        out.write_text(_text(report))
    else:
        publish(_text(report), out)
    return 0


def _measure(args, model_dir: Path, nats_url: str, core: int) -> dict:
    from worker.engine import SamplingParams
    from worker.pipeline import StageSpec, specs_for

    engine = pinned_engine(model_dir, core)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    reference = {p: engine.generate("m", p, greedy).new_token_ids for p in PROMPTS}
    num_layers = engine.runner.slots["m"].config.num_layers
    one = [StageSpec(0, num_layers)]
    two = specs_for(num_layers, [1.0, 1.0], [("driver", ""), ("remote", STAGE_ID)])
    plan = [((i + 1) * args.phase_s, two if i % 2 == 0 else one) for i in range(2 * args.cycles)]
    streams, switches = drive(engine, args.streams, args.max_tokens, (len(plan) + 1) * args.phase_s, plan,
                              nats_url)
    engine.close_pipelines()
    steady_of = steady_outside(streams, switches, args.settle_s, args.phase_s / 4)
    baseline_s = (args.phase_s - args.settle_s) / 2
    rows = [switch_row(s, streams, args.settle_s, baseline_s, reference) for s in switches]
    return {"model": f"{args.arch}/{args.preset}", "streams": args.streams, "max_tokens": args.max_tokens,
            "split": [[s.start, s.end] for s in two], "steady": steady_of, "switches": rows, "summary": summary(rows),
            "load_average_1m": os.getloadavg()[0]}


def _text(report: dict) -> str:
    lines = [report["command"], "", f"model {report['model']}, {report['streams']} streams x {report['max_tokens']} tokens, "
             f"2-stage split {report['split']}, load average {report['load_average_1m']:.2f}", ""]
    for stages, s in report["steady"].items():
        lines.append(f"steady {stages} stage(s), outside the switches: TTFT {s['ttft_ms']:.1f} ms, "
                     f"TPOT {s['tpot_ms']:.2f} ms, longest gap {s['max_gap_ms']:.1f} ms "
                     f"({s['num_requests']} requests)")
    lines.append("")
    for r in report["switches"]:
        lines.append(f"switch {r['from_stages']} -> {r['to_stages']}: downtime {r['downtime_ms']:.1f} ms "
                     f"(longest gap before/after: {r['steady_max_gap_ms']:.1f} ms), "
                     f"TTFT overhead {r['ttft_overhead']}, TPOT overhead {r['tpot_overhead']}, "
                     f"outputs match {r['output_matches']} (switch took {r['switch_ms']} ms, "
                     f"its step-boundary pause {r['pause_ms']} ms, "
                     f"{r['copy_rounds']} background round(s), tail {r['tail_blocks']} blocks)")
    lines += ["", f"summary: {report['summary']}"]
    return "\n".join(lines) + "\n"
