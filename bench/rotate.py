"""`c2cserve bench rotate`: recompute preemption vs KV rotation to host memory, side by side.

One worker engine per mode, in one process, on the same checkpoint (a synthetic "small"
Llama unless --model) and the same open-loop workload: `--decodes` long decodes start at
once; while they decode, a burst of `--burst` long prompts arrives, more than the KV cache
(`--kv-blocks`) holds beside the decodes. Modes:
- recompute: no host tier (`host_kv_bytes=0`): a waiting request starts when blocks free
  up; a sequence that cannot grow preempts another by recompute (the engine as before).
- rotation: a host tier of `--host-kv-mib`: decodes with TPOT slack rotate their KV out
  so the burst starts in time, and rotate back in before their slack runs out.
SLOs come from a calibration run on the same engine settings (no host tier): the TTFT SLO
is `--ttft-factor` x one burst prompt's TTFT alone, the TPOT SLO `--tpot-factor` x the
decodes' mean time per token while they run alone. Per mode: ttft_attainment (share of
all requests with TTFT within SLO), tpot_p99_s (p99 over requests of the mean time per
output token), output_tokens_per_s (generated tokens / makespan), and the rotation and
preemption counts. `--json` prints one JSON object with a row per mode.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.output import command_line, publish
from bench.report import percentile
from services.errors import InvalidRequest

RESULTS = Path(__file__).resolve().parent / "results" / "rotate.json"
BLOCK_SIZE = 16
MODES = ("recompute", "rotation")


@dataclass
class Arrival:
    request_id: str
    at_s: float  # after the run's start
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class Record:
    arrival_s: float
    first_s: float | None = None
    last_s: float | None = None
    num_generated: int = 0
    is_burst: bool = False


@dataclass
class Slos:
    ttft_s: float
    tpot_s: float
    calibration: dict = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a synthetic small llama)")
    parser.add_argument("--decodes", type=int, default=4, help="long decodes running when the burst comes")
    parser.add_argument("--decode-prompt", type=int, default=256, help="their prompt tokens")
    parser.add_argument("--decode-tokens", type=int, default=160, help="their output tokens")
    parser.add_argument("--burst", type=int, default=4, help="long prompts in the burst")
    parser.add_argument("--burst-prompt", type=int, default=384, help="their prompt tokens")
    parser.add_argument("--burst-tokens", type=int, default=16, help="their output tokens")
    parser.add_argument("--burst-after", type=int, default=40, help="the burst comes after this many decode steps")
    parser.add_argument("--kv-blocks", type=int, default=112, help=f"KV cache blocks of {BLOCK_SIZE} tokens")
    parser.add_argument("--host-kv-mib", type=int, default=512, help="rotation's host tier")
    parser.add_argument("--ttft-factor", type=float, default=3.0, help="TTFT SLO / a burst prompt's TTFT alone")
    parser.add_argument("--tpot-factor", type=float, default=3.0, help="TPOT SLO / the decodes' TPOT alone")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object (a row per mode)")
    parser.add_argument("--out", default=str(RESULTS), help="results file (with the command line)")


def run(args: argparse.Namespace) -> int:
    if min(args.decodes, args.burst, args.decode_tokens, args.burst_tokens, args.kv_blocks) < 1:
        raise InvalidRequest("--decodes, --burst, --*-tokens and --kv-blocks must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else _synth_model(Path(tmp) / "small-llama")
        slos = calibrate(model_dir, args)
        rows = {mode: run_mode(model_dir, mode, args, slos) for mode in MODES}
    result = {"command": command_line("rotate"), "ttft_slo_s": round(slos.ttft_s, 4),
              "tpot_slo_s": round(slos.tpot_s, 4), "calibration": slos.calibration, "modes": rows}
    report = json.dumps(result, indent=1) + "\n" if args.json else _table(result)
    publish(report, args.out)
    return 0


def _synth_model(out: Path) -> Path:
    from worker.synth import synth_model

    return synth_model("llama", "small", out)


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


def workload(args, vocab_size: int) -> list[Arrival]:
    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(16, vocab_size) for _ in range(n)]

    decodes = [Arrival(f"d{i}", 0.0, prompt(args.decode_prompt), args.decode_tokens) for i in range(args.decodes)]
    return decodes + [Arrival(f"b{i}", -1.0, prompt(args.burst_prompt), args.burst_tokens) for i in range(args.burst)]


def calibrate(model_dir: Path, args) -> Slos:
    """The decodes alone (their TPOT), then one burst prompt alone (its TTFT)."""
    engine = _engine(model_dir, args, host_kv_bytes=0)
    arrivals = workload(args, engine.runner.slots["m"].config.vocab_size)
    decodes = [a for a in arrivals if a.request_id.startswith("d")]
    for a in decodes:
        a.max_tokens = min(a.max_tokens, args.burst_after)
    records = drive(engine, decodes, Slos(1e9, 1e9))
    tpot_s = percentile([_tpot(r) for r in records.values()], 50)
    burst = next(a for a in arrivals if a.request_id.startswith("b"))
    drive(engine, [burst], Slos(1e9, 1e9))  # a first prefill of this length pays one-time work
    burst.request_id += "-again"
    ttft_s = drive(engine, [burst], Slos(1e9, 1e9))[burst.request_id]
    ttft_s = ttft_s.first_s - ttft_s.arrival_s
    return Slos(args.ttft_factor * ttft_s, args.tpot_factor * tpot_s,
                {"decode_tpot_s": round(tpot_s, 5), "burst_ttft_alone_s": round(ttft_s, 4)})


def run_mode(model_dir: Path, mode: str, args, slos: Slos) -> dict:
    host_kv_bytes = args.host_kv_mib << 20 if mode == "rotation" else 0
    engine = _engine(model_dir, args, host_kv_bytes)
    arrivals = workload(args, engine.runner.slots["m"].config.vocab_size)
    burst_at_s = args.burst_after * slos.tpot_s / args.tpot_factor
    for a in arrivals:
        if a.at_s < 0:
            a.at_s = burst_at_s
    start_s = time.time()
    records = drive(engine, arrivals, slos)
    end_s = max(r.last_s for r in records.values())
    stats = engine.stats()
    ttft_ok = [r.first_s - r.arrival_s <= slos.ttft_s for r in records.values()]
    burst_ok = [ok for ok, r in zip(ttft_ok, records.values(), strict=True) if r.is_burst]
    tpots = [t for t in (_tpot(r) for r in records.values()) if t is not None]
    return {
        "ttft_attainment": round(sum(ttft_ok) / len(ttft_ok), 4),
        "burst_ttft_attainment": round(sum(burst_ok) / len(burst_ok), 4),
        "ttft_p99_s": round(percentile([r.first_s - r.arrival_s for r in records.values()], 99), 4),
        "tpot_p99_s": round(percentile(tpots, 99), 5),
        "tpot_attainment": round(sum(t <= slos.tpot_s for t in tpots) / len(tpots), 4),
        "output_tokens_per_s": round(sum(r.num_generated for r in records.values()) / (end_s - start_s), 2),
        "makespan_s": round(end_s - start_s, 3),
        "num_preemptions": stats.num_preemptions,
        "num_swaps_out": stats.num_swaps_out, "num_swaps_in": stats.num_swaps_in,
        "swap_out_bytes": stats.swap_out_bytes, "swap_in_bytes": stats.swap_in_bytes,
        "num_rotation_stalls": stats.num_rotation_stalls,
    }


def drive(engine, arrivals: list[Arrival], slos: Slos) -> dict[str, Record]:
    """Open loop: each request is added when its time comes; steps until all are done."""
    from worker.engine import SamplingParams

    pending = sorted(arrivals, key=lambda a: a.at_s)
    records: dict[str, Record] = {}
    start_s = time.time()
    while pending or engine.has_work():
        now_s = time.time()
        while pending and start_s + pending[0].at_s <= now_s:
            a = pending.pop(0)
            records[a.request_id] = Record(start_s + a.at_s, is_burst=a.request_id.startswith("b"))
            engine.add_request(a.request_id, "m", prompt_token_ids=a.prompt_token_ids,
                               params=SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True),
                               arrival_s=start_s + a.at_s, ttft_slo_s=slos.ttft_s, tpot_slo_s=slos.tpot_s)
        if not engine.has_work():
            time.sleep(max(0.0, start_s + pending[0].at_s - time.time()))
            continue
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            record = records[out.request_id]
            if out.new_token_ids:
                record.first_s = record.first_s or time.time()
                record.last_s = time.time()
                record.num_generated += len(out.new_token_ids)
    return records


def _tpot(record: Record) -> float | None:
    if record.num_generated < 2:
        return None
    return (record.last_s - record.first_s) / (record.num_generated - 1)


def _table(result: dict) -> str:
    lines = [f"# {result['command']}",
             f"SLOs: TTFT {result['ttft_slo_s']:.3f} s, TPOT {result['tpot_slo_s']:.4f} s "
             f"(calibration: {result['calibration']})",
             f"{'mode':<10} {'ttft_att':>9} {'burst_att':>9} {'ttft_p99_s':>10} {'tpot_p99_s':>10} "
             f"{'tok/s':>8} {'preempt':>7} {'swaps':>9}"]
    for mode, row in result["modes"].items():
        lines.append(f"{mode:<10} {row['ttft_attainment']:>9.3f} {row['burst_ttft_attainment']:>9.3f} "
                     f"{row['ttft_p99_s']:>10.3f} {row['tpot_p99_s']:>10.4f} {row['output_tokens_per_s']:>8.1f} "
                     f"{row['num_preemptions']:>7} {row['num_swaps_out']:>4}/{row['num_swaps_in']:<4}")
    return "\n".join(lines) + "\n"
