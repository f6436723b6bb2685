"""`c2cserve bench rotate`: recompute preemption vs KV rotation to host memory, side by side.

One worker engine per mode and round, in one process, on the same checkpoint (a synthetic
fp32 Llama, `--preset`, unless --model) and the same open-loop workload: `--decodes` long
decodes start at once; while they decode, a burst of `--burst` long prompts arrives, one
every `--burst-gap` prefill times, each larger than the KV blocks the decodes leave free
(`--kv-blocks`). Modes:
- recompute: no host tier (`host_kv_bytes=0`): a waiting request starts when blocks free
  up; a sequence that cannot grow preempts another by recompute (the engine as before).
- recompute_slo: the rotation policy without a host tier: the decodes it would rotate out
  are preempted by recompute instead (what the policy alone buys).
- rotation: a host tier of `--host-kv-mib`: decodes with TPOT slack rotate their KV out so
  the burst starts in time, and rotate back in before their slack runs out.
SLOs come from a calibration run alone (no host tier): each request's TTFT SLO is
`--ttft-factor` x its kind's TTFT alone (the decodes' batch prefill; one burst prompt), the
TPOT SLO `--tpot-factor` x the decodes' time per token alone. Per mode, the median over
`--rounds` interleaved rounds of: ttft_attainment (share of all requests within their TTFT
SLO), tpot_p99_s (p99 over requests of the mean time per output token),
output_tokens_per_s (generated tokens / makespan); and the rotation and preemption counts.
`--json` prints one JSON object (a row per mode, every round's values, the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.output import command_line, publish
from bench.report import percentile
from services.errors import InvalidRequest

RESULTS = Path(__file__).resolve().parent / "results" / "rotate.json"
BLOCK_SIZE = 16
MODES = ("recompute", "recompute_slo", "rotation")
NO_SLO_S = 1e9


@dataclass
class Arrival:
    request_id: str
    at_s: float  # after the run's start
    prompt_token_ids: list[int]
    max_tokens: int
    ttft_slo_s: float = NO_SLO_S
    after_tokens: int = 0  # at_s counts from when every decode has generated this many tokens


@dataclass
class Record:
    arrival_s: float
    ttft_slo_s: float
    first_s: float | None = None
    last_s: float | None = None
    num_generated: int = 0


@dataclass
class Calibration:
    decode_ttft_s: float  # the decodes' batch prefill, alone
    decode_tpot_s: float
    burst_ttft_s: float   # one burst prompt, alone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a synthetic llama, --preset)")
    parser.add_argument("--preset", default="tiny", help="the synthetic llama's size (fp32: no bf16 dot on this CPU)")
    parser.add_argument("--decodes", type=int, default=4, help="long decodes running when the burst comes")
    parser.add_argument("--decode-prompt", type=int, default=512, help="their prompt tokens")
    parser.add_argument("--decode-tokens", type=int, default=128, help="their output tokens")
    parser.add_argument("--burst", type=int, default=4, help="long prompts in the burst")
    parser.add_argument("--burst-prompt", type=int, default=512, help="their prompt tokens")
    parser.add_argument("--burst-tokens", type=int, default=16, help="their output tokens")
    parser.add_argument("--burst-gap", type=float, default=3.0,
                        help="between two burst arrivals, in units of one burst prompt's TTFT alone")
    parser.add_argument("--burst-after", type=int, default=80,
                        help="the burst comes once the decodes are about this many tokens in")
    parser.add_argument("--kv-blocks", type=int, default=168, help=f"KV cache blocks of {BLOCK_SIZE} tokens")
    parser.add_argument("--host-kv-mib", type=int, default=512, help="rotation's host tier")
    parser.add_argument("--ttft-factor", type=float, default=3.0, help="TTFT SLO / the request's TTFT alone")
    parser.add_argument("--tpot-factor", type=float, default=3.0, help="TPOT SLO / the decodes' TPOT alone")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the modes interleaved in each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object (a row per mode)")
    parser.add_argument("--out", default=str(RESULTS), help="results file (with the command line)")


def run(args: argparse.Namespace) -> int:
    if min(args.decodes, args.burst, args.decode_tokens, args.burst_tokens, args.kv_blocks, args.rounds) < 1:
        raise InvalidRequest("--decodes, --burst, --*-tokens, --kv-blocks and --rounds must be at least 1")
    if not 0 < args.burst_after < args.decode_tokens:
        raise InvalidRequest("--burst-after must be in [1, --decode-tokens)", param="--burst-after")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else _synth_model(Path(tmp) / "llama", args.preset)
        rounds = []
        for _ in range(args.rounds):  # this machine's speed drifts: SLOs measured again each round
            calibration = calibrate(model_dir, args)
            rounds.append({"slos": {"decode_ttft_s": round(args.ttft_factor * calibration.decode_ttft_s, 4),
                                    "burst_ttft_s": round(args.ttft_factor * calibration.burst_ttft_s, 4),
                                    "tpot_s": round(args.tpot_factor * calibration.decode_tpot_s, 5)}}
                          | {mode: run_mode(model_dir, mode, args, calibration) for mode in MODES})
    result = {"command": command_line("rotate"),
              "modes": {mode: _median_row([r[mode] for r in rounds]) for mode in MODES},
              "rounds": rounds, "loadavg": [round(x, 2) for x in os.getloadavg()]}
    report = json.dumps(result, indent=1) + "\n" if args.json else _table(result)
    publish(report, args.out)
    return 0


def _synth_model(out: Path, preset: str) -> Path:
    from worker.synth import synth_model

    return synth_model("llama", preset, out, dtype="float32")


def _engine(model_dir: Path, args, host_kv_bytes: int):
    from worker.checkpoint import load_config
    from worker.engine import Engine, EngineConfig
    from worker.model import kv_bytes_per_token

    per_block = BLOCK_SIZE * kv_bytes_per_token(load_config(model_dir))  # the engine's KV is fp32
    engine = Engine(EngineConfig(residency="load", block_size=BLOCK_SIZE, host_kv_bytes=host_kv_bytes,
                                 kv_cache_bytes=args.kv_blocks * per_block, num_threads=args.threads or None))
    engine.add_model("m", model_dir)
    engine.warmup()
    return engine


def workload(args, vocab_size: int, calibration: Calibration | None) -> list[Arrival]:
    """The decodes at 0; the burst once they are `--burst-after` tokens in, one prompt
    every `--burst-gap` prefill times. With no calibration: no SLOs, the burst at 0."""
    rng = random.Random(args.seed)
    c = calibration or Calibration(NO_SLO_S / args.ttft_factor, 0.0, NO_SLO_S / args.ttft_factor)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(16, vocab_size) for _ in range(n)]

    decodes = [Arrival(f"d{i}", 0.0, prompt(args.decode_prompt), args.decode_tokens,
                       args.ttft_factor * c.decode_ttft_s) for i in range(args.decodes)]
    gap_s, after_tokens = (args.burst_gap * c.burst_ttft_s, args.burst_after) if calibration else (0.0, 0)
    return decodes + [Arrival(f"b{i}", i * gap_s, prompt(args.burst_prompt), args.burst_tokens,
                              args.ttft_factor * c.burst_ttft_s, after_tokens) for i in range(args.burst)]


def calibrate(model_dir: Path, args) -> Calibration:
    """The decodes alone (their TTFT and TPOT), then one burst prompt alone (its TTFT)."""
    engine = _engine(model_dir, args, host_kv_bytes=0)
    arrivals = workload(args, engine.runner.slots["m"].config.vocab_size, None)
    decodes = [a for a in arrivals if a.request_id.startswith("d")]
    for a in decodes:
        a.max_tokens = min(a.max_tokens, args.burst_after)
    records = drive(engine, decodes, NO_SLO_S).values()
    burst = next(a for a in arrivals if a.request_id.startswith("b"))
    drive(engine, [burst], NO_SLO_S)  # a first prefill of this length pays one-time work
    burst.request_id += "-again"
    burst_record = drive(engine, [burst], NO_SLO_S)[burst.request_id]
    return Calibration(max(r.first_s - r.arrival_s for r in records),
                       statistics.median(_tpot(r) for r in records),
                       burst_record.first_s - burst_record.arrival_s)


def run_mode(model_dir: Path, mode: str, args, calibration: Calibration) -> dict:
    engine = _engine(model_dir, args, args.host_kv_mib << 20 if mode == "rotation" else 0)
    if mode == "recompute_slo":
        from worker.rotation import Rotator

        engine.scheduler.rotator = Rotator(copier=None)  # the rotation policy, no host tier: recompute
    arrivals = workload(args, engine.runner.slots["m"].config.vocab_size, calibration)
    tpot_slo_s = args.tpot_factor * calibration.decode_tpot_s
    start_s = time.time()
    records = list(drive(engine, arrivals, tpot_slo_s).values())
    makespan_s = max(r.last_s for r in records) - start_s
    ttft_ok = [r.first_s - r.arrival_s <= r.ttft_slo_s for r in records]
    tpots = [t for t in map(_tpot, records) if t is not None]
    stats = engine.stats()
    return {
        "ttft_attainment": round(sum(ttft_ok) / len(ttft_ok), 4),
        "burst_ttft_attainment": round(sum(ttft_ok[args.decodes:]) / args.burst, 4),
        "tpot_p99_s": round(percentile(tpots, 99), 5),
        "tpot_attainment": round(sum(t <= tpot_slo_s for t in tpots) / len(tpots), 4),
        "output_tokens_per_s": round(sum(r.num_generated for r in records) / makespan_s, 2),
        "makespan_s": round(makespan_s, 3),
        "num_preemptions": stats.num_preemptions,
        "num_swaps_out": stats.num_swaps_out, "num_swaps_in": stats.num_swaps_in,
        "swap_out_bytes": stats.swap_out_bytes, "swap_in_bytes": stats.swap_in_bytes,
        "num_rotation_stalls": stats.num_rotation_stalls,
    }


def drive(engine, arrivals: list[Arrival], tpot_slo_s: float) -> dict[str, Record]:
    """Open loop: each request is added when its time comes (those with `after_tokens`
    once the requests without have generated that many tokens each); steps until all
    are done. Records are in the order of `arrivals`."""
    from worker.engine import SamplingParams

    pending = sorted(arrivals, key=lambda a: (a.after_tokens, a.at_s))
    start_s = time.time()
    records = {a.request_id: Record(0.0, a.ttft_slo_s) for a in arrivals}
    first_wave = [records[a.request_id] for a in arrivals if not a.after_tokens]
    onset_s: float | None = None  # when the first wave was `after_tokens` in
    while pending or engine.has_work():
        if onset_s is None and pending and all(r.num_generated >= pending[-1].after_tokens for r in first_wave):
            onset_s = time.time()
        while pending and (base_s := onset_s if pending[0].after_tokens else start_s) is not None \
                and base_s + pending[0].at_s <= time.time():
            a = pending.pop(0)
            records[a.request_id].arrival_s = base_s + a.at_s
            engine.add_request(a.request_id, "m", prompt_token_ids=a.prompt_token_ids,
                               params=SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True),
                               arrival_s=base_s + a.at_s, ttft_slo_s=a.ttft_slo_s, tpot_slo_s=tpot_slo_s)
        if not engine.has_work():
            time.sleep(max(0.0, (onset_s or start_s) + pending[0].at_s - time.time()))
            continue
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            record, now_s = records[out.request_id], time.time()
            if out.new_token_ids:
                record.first_s = record.first_s or now_s
                record.last_s = now_s
                record.num_generated += len(out.new_token_ids)
    return records


def _tpot(record: Record) -> float | None:
    if record.num_generated < 2:
        return None
    return (record.last_s - record.first_s) / (record.num_generated - 1)


def _median_row(rows: list[dict]) -> dict:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def _table(result: dict) -> str:
    lines = [f"# {result['command']}", f"medians of {len(result['rounds'])} rounds; SLOs of each: "
             + "; ".join(str(r["slos"]) for r in result["rounds"]),
             f"{'mode':<10} {'ttft_att':>9} {'burst_att':>9} {'tpot_p99_s':>10} {'tpot_att':>8} "
             f"{'tok/s':>8} {'preempt':>7} {'swaps out/in':>12}"]
    for mode, row in result["modes"].items():
        lines.append(f"{mode:<10} {row['ttft_attainment']:>9.3f} {row['burst_ttft_attainment']:>9.3f} "
                     f"{row['tpot_p99_s']:>10.4f} {row['tpot_attainment']:>8.3f} {row['output_tokens_per_s']:>8.1f} "
                     f"{row['num_preemptions']:>7} {row['num_swaps_out']:>6}/{row['num_swaps_in']:<5}")
    return "\n".join(lines) + "\n"
