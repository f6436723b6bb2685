"""`c2cserve bench engine`: prefill and decode tokens/s of our engine vs transformers.

Each engine runs in its own process with its own defaults: ours in this one (c2cserve
sets OMP_WAIT_POLICY=PASSIVE), transformers in a child (bench/engine_hf.py) without that
setting, with the same torch thread count, loaded once. Measurements are interleaved:
every round runs each batch size on ours, then on transformers, so a burst of other load
on a shared machine hits both; the table gives each engine's median over `--rounds`
rounds and the ratio of the medians, next to the machine's read bandwidth measured in
the same run and our decode's weight bytes per step time (GB/s, and % of that probe).

Ours: B requests of `--prompt-len` random tokens; the first step prefills them all
(one batch), then `--decode-tokens` decode steps of B tokens. Transformers: one forward
over the [B, prompt_len] batch (prefill), then per-token forwards with past_key_values
(greedy, a fixed-size loop). Prints a table (or --json) and, with --out, writes it to a
file with the command line on top.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--hf-dtype", choices=("auto", "float32"), default="auto",
                        help="transformers weights: the checkpoint dtype (auto) or fp32")
    parser.add_argument("--residency", choices=("host", "load"), default="host")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="our weights int8 per-channel (C2C_QUANTIZE); transformers keeps the checkpoint's")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="also write the report to this file")


def run(args) -> int:
    import torch

    from c2c_kernels.membw import measure_read_gbps
    from services.errors import InvalidRequest

    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.prompt_len < 1 or args.decode_tokens < 1 or args.rounds < 1:
        raise InvalidRequest("--batch-sizes, --prompt-len, --decode-tokens and --rounds must be positive")
    load_start = round(os.getloadavg()[0], 2)
    engine, model_id = _make_engine(args, max(batch_sizes))
    threads = torch.get_num_threads()
    vocab = min(engine.tokenizer(model_id).vocab_size, engine.runner.slots[model_id].config.vocab_size)
    prompts = _random_prompts(max(batch_sizes), args.prompt_len, vocab)
    peer = None if args.no_hf else HfPeer(args.model, args.hf_dtype, threads)
    samples = {b: {"ours": [], "hf": []} for b in batch_sizes}
    try:
        for batch in batch_sizes:  # warm-up on the same shapes first: compilation, per-shape autotune
            _ours(engine, model_id, prompts[:batch], args.prompt_len, 2)
            if peer is not None:
                peer.run(prompts[:batch], 2)
        for _ in range(args.rounds):
            for batch in batch_sizes:
                samples[batch]["ours"].append(_ours(engine, model_id, prompts[:batch], args.prompt_len,
                                                    args.decode_tokens))
                if peer is not None:
                    samples[batch]["hf"].append(peer.run(prompts[:batch], args.decode_tokens))
    finally:
        if peer is not None:
            peer.close()
    read_gbps = measure_read_gbps()
    weight_bytes = engine.runner.slots[model_id].model.read_bytes_per_step()
    config = engine.runner.slots[model_id].config
    report = {"model": str(args.model), "arch": config.arch, "dtype": config.dtype, "threads": threads,
              "quantize": args.quantize,
              "cpu_count": os.cpu_count(), "load_avg_1m_start": load_start,
              "load_avg_1m": round(os.getloadavg()[0], 2), "rounds": args.rounds,
              "read_probe_gbps": round(read_gbps, 1), "weight_bytes": weight_bytes,
              "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
              "hf_dtype": None if args.no_hf else args.hf_dtype,
              "results": [_row(b, samples[b], weight_bytes, read_gbps) for b in batch_sizes]}
    text = json.dumps(report) if args.json else _table(report)
    print(text)
    if args.out:
        command = "c2cserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.out).write_text(f"$ {command}\n{text}\n")
    return 0


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _row(batch: int, samples: dict, weight_bytes: int, read_gbps: float) -> dict:
    """Medians over the rounds; ratios of the medians; our decode's weight GB/s vs the probe."""
    ours = {k: _median(samples["ours"], k) for k in samples["ours"][0]}
    ours["prefill_all"] = [round(r["prefill_tokens_per_s"], 1) for r in samples["ours"]]
    ours["decode_all"] = [round(r["decode_tokens_per_s"], 1) for r in samples["ours"]]
    ours["weight_gbps"] = weight_bytes / (ours["decode_step_ms"] / 1000) / 1e9
    ours["roofline_fraction"] = ours["weight_gbps"] / read_gbps
    row = {"batch": batch, "ours": ours}
    if samples["hf"]:
        hf = {k: _median(samples["hf"], k) for k in samples["hf"][0]}
        hf["prefill_all"] = [round(r["prefill_tokens_per_s"], 1) for r in samples["hf"]]
        hf["decode_all"] = [round(r["decode_tokens_per_s"], 1) for r in samples["hf"]]
        row.update(hf=hf, prefill_ratio=ours["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"],
                   decode_ratio=ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"])
    return row


class HfPeer:
    """transformers in a child process with its own defaults (bench/engine_hf.py)."""

    def __init__(self, model_dir, dtype: str, threads: int):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.engine_hf", str(model_dir), dtype, str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(Path(__file__).resolve().parent.parent))
        self._read()  # {"ready": true} once the model is loaded

    def run(self, prompts, decode_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "decode_tokens": decode_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers peer exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _make_engine(args, max_batch: int):
    from worker.engine import Engine, EngineConfig

    if args.quantize:
        os.environ["C2C_QUANTIZE"] = args.quantize  # the runner reads it
    config = EngineConfig(max_num_seqs=max_batch, max_num_batched_tokens=max_batch * args.prompt_len,
                          chunk_size=args.prompt_len, residency=args.residency, num_threads=args.threads)
    engine = Engine(config)
    model_id = Path(args.model).resolve().name
    engine.add_model(model_id, args.model, preload=True)
    return engine, model_id


def _random_prompts(num: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(num)]


def _ours(engine, model_id: str, prompts, prompt_len: int, decode_tokens: int) -> dict:
    """Prefill all prompts in one step, then decode_tokens steps; tokens/s of each phase."""
    from worker.engine import SamplingParams

    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", model_id, prompt_token_ids=prompt[:prompt_len], params=params)
    start_s = time.perf_counter()
    first = engine.step()
    prefill_s = time.perf_counter() - start_s
    if len(first) != len(prompts):
        raise RuntimeError(f"prefill took more than one step ({len(first)} of {len(prompts)} first tokens)")
    start_s, num_decoded = time.perf_counter(), 0
    while engine.has_work():
        num_decoded += sum(len(o.new_token_ids) for o in engine.step())
    decode_s = time.perf_counter() - start_s
    return {"prefill_tokens_per_s": len(prompts) * prompt_len / prefill_s,
            "decode_tokens_per_s": num_decoded / decode_s,
            "decode_step_ms": 1000 * decode_s / decode_tokens}


def _table(report: dict) -> str:
    nan = float("nan")
    lines = [f"model {report['model']} ({report['arch']}, {report['dtype']}, ours {report['quantize'] or 'not'} "
             f"quantized: {report['weight_bytes'] / 1e6:.0f} MB read per decode step), threads {report['threads']}, prompt {report['prompt_len']}, decode "
             f"{report['decode_tokens']}, transformers dtype {report['hf_dtype']} (own process, own defaults)",
             f"machine: {report['cpu_count']} cores, 1-minute load average {report['load_avg_1m_start']} at the "
             f"start, {report['load_avg_1m']} at the end; read probe {report['read_probe_gbps']} GB/s; "
             f"medians of {report['rounds']} interleaved rounds",
             f"{'batch':>5} {'ours prefill':>13} {'hf prefill':>11} {'ratio':>6} "
             f"{'ours decode':>12} {'hf decode':>10} {'ratio':>6} {'ours GB/s':>10} {'% probe':>8}  (tokens/s)"]
    for row in report["results"]:
        ours, hf = row["ours"], row.get("hf")
        lines.append(f"{row['batch']:>5} {ours['prefill_tokens_per_s']:>13.1f} "
                     f"{hf['prefill_tokens_per_s'] if hf else nan:>11.1f} {row.get('prefill_ratio', nan):>6.2f} "
                     f"{ours['decode_tokens_per_s']:>12.1f} {hf['decode_tokens_per_s'] if hf else nan:>10.1f} "
                     f"{row.get('decode_ratio', nan):>6.2f} {ours['weight_gbps']:>10.1f} "
                     f"{100 * ours['roofline_fraction']:>7.0f}%")
    lines.append("per round (prefill / decode tokens/s):")
    for row in report["results"]:
        ours, hf = row["ours"], row.get("hf")
        lines.append(f"  batch {row['batch']}: ours {ours['prefill_all']} / {ours['decode_all']}"
                     + (f"; hf {hf['prefill_all']} / {hf['decode_all']}" if hf else ""))
    return "\n".join(lines)
