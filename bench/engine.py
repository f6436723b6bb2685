"""`c2cserve bench engine`: prefill and decode tokens/s of our engine vs transformers and
(when llama-cpp-python is there) llama.cpp, each peer in its own process (bench/engine_peers.py).

`--quantize none,int8,q4` runs our engine once per weight format (each its own host-store
copy, in this process), side by side in the same rounds, with each one's decode speed
relative to the first listed.

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
import sys
import time
from pathlib import Path

from bench.engine_peers import start_peers


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
    parser.add_argument("--quantize", default="none",
                        help="our weight formats, comma-separated: none (the checkpoint's), int8 (per channel), "
                             "q4 (4-bit groups of 32); e.g. none,int8,q4. Transformers keeps the checkpoint's")
    parser.add_argument("--llamacpp-python", default=None, metavar="PYTHON",
                        help="an interpreter with llama-cpp-python (e.g. its own venv's): adds llama.cpp on GGUF "
                             "copies of the same weights, one per format of ours (default: this one, if it has it)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="also write the report to this file")


def run(args) -> int:
    import torch

    from c2c_kernels.membw import measure_read_gbps
    from services.errors import InvalidRequest

    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.prompt_len < 1 or args.decode_tokens < 1 or args.rounds < 1:
        raise InvalidRequest("--batch-sizes, --prompt-len, --decode-tokens and --rounds must be positive")
    modes = [None if m.strip() in ("", "none") else m.strip() for m in str(args.quantize).split(",")]
    if any(m not in (None, "int8", "q4") for m in modes) or len(set(modes)) != len(modes):
        raise InvalidRequest(f"--quantize {args.quantize!r}: distinct formats among none, int8, q4")
    load_start = round(os.getloadavg()[0], 2)
    engines = {_label(m): _make_engine(args, max(batch_sizes), m) for m in modes}  # label -> (engine, model id)
    threads = torch.get_num_threads()
    engine, model_id = next(iter(engines.values()))
    config = engine.runner.slots[model_id].config
    vocab = min(engine.tokenizer(model_id).vocab_size, config.vocab_size)
    prompts = _random_prompts(max(batch_sizes), args.prompt_len, vocab)
    peers, same_format = start_peers(args, modes, config.dtype, threads)
    samples = {b: {label: [] for label in [*engines, *peers]} for b in batch_sizes}
    try:
        for round_index in range(args.rounds + 1):  # round 0 warms up: compilation, per-shape autotune
            for batch in batch_sizes:
                num_tokens = 2 if round_index == 0 else args.decode_tokens
                for label, (engine, model_id) in engines.items():
                    sample = _ours(engine, model_id, prompts[:batch], args.prompt_len, num_tokens)
                    samples[batch][label] += [sample] if round_index else []
                for label, peer in peers.items():
                    sample = peer.run(prompts[:batch], num_tokens)
                    samples[batch][label] += [sample] if round_index and "skipped" not in sample else []
    finally:
        for peer in peers.values():
            peer.close()
    read_gbps = measure_read_gbps()
    weight_bytes = {label: e.runner.slots[m].model.read_bytes_per_step() for label, (e, m) in engines.items()}
    report = {"model": str(args.model), "arch": config.arch, "dtype": config.dtype, "threads": threads,
              "quantize": [m or "none" for m in modes], "cpu_count": os.cpu_count(), "load_avg_1m_start": load_start,
              "load_avg_1m": round(os.getloadavg()[0], 2), "rounds": args.rounds,
              "read_probe_gbps": round(read_gbps, 1), "weight_bytes": weight_bytes,
              "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
              "hf_dtype": None if args.no_hf else args.hf_dtype,
              "peers": list(peers),
              "results": [_row(b, samples[b], weight_bytes, read_gbps,
                               {_label(m): peer for m, peer in same_format.items()}) for b in batch_sizes]}
    text = json.dumps(report) if args.json else _table(report)
    if args.out:  # first: a reader of stdout that stops early (| head) must not lose the file
        command = "c2cserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.out).write_text(f"$ {command}\n{text}\n")
    print(text)
    return 0


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _label(mode: str | None) -> str:
    return "ours" if mode is None else f"ours-{mode}"


def _summary(rows: list[dict]) -> dict:
    """Medians over the rounds, and every round's prefill and decode tokens/s."""
    out = {k: _median(rows, k) for k in rows[0]}
    out["prefill_all"] = [round(r["prefill_tokens_per_s"], 1) for r in rows]
    out["decode_all"] = [round(r["decode_tokens_per_s"], 1) for r in rows]
    return out


def _row(batch: int, samples: dict, weight_bytes: dict, read_gbps: float, same_format: dict[str, str]) -> dict:
    """Per engine: medians, decode weight GB/s vs the probe, decode vs the first of ours, vs
    transformers and vs llama.cpp at the same format (ratios of the medians). "ours" is the
    first of ours and "hf" transformers, for older readers."""
    labels = [label for label in samples if label in weight_bytes]
    variants = {label: _summary(samples[label]) for label in labels}
    peers = {label: _summary(rows) for label, rows in samples.items() if label not in weight_bytes and rows}
    first = variants[labels[0]]
    for label, ours in variants.items():
        ours["weight_gbps"] = weight_bytes[label] / (ours["decode_step_ms"] / 1000) / 1e9
        ours["roofline_fraction"] = ours["weight_gbps"] / read_gbps
        ours["decode_vs_first"] = ours["decode_tokens_per_s"] / first["decode_tokens_per_s"]
        hf = peers.get("transformers")
        if hf:
            ours.update(prefill_vs_hf=ours["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"],
                        decode_vs_hf=ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"])
        llamacpp = peers.get(same_format.get(label))
        if llamacpp:
            ours.update(prefill_vs_llamacpp=ours["prefill_tokens_per_s"] / llamacpp["prefill_tokens_per_s"],
                        decode_vs_llamacpp=ours["decode_tokens_per_s"] / llamacpp["decode_tokens_per_s"])
    row = {"batch": batch, "ours": first, "variants": variants, "peers": peers}
    if "transformers" in peers:
        row.update(hf=peers["transformers"], prefill_ratio=first["prefill_vs_hf"], decode_ratio=first["decode_vs_hf"])
    return row


def _make_engine(args, max_batch: int, quantize: str | None):
    from worker.engine import Engine, EngineConfig

    config = EngineConfig(max_num_seqs=max_batch, max_num_batched_tokens=max_batch * args.prompt_len,
                          chunk_size=args.prompt_len, residency=args.residency, num_threads=args.threads,
                          quantize=quantize or "")
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
    sizes = ", ".join(f"{label} {nbytes / 1e6:.0f} MB" for label, nbytes in report["weight_bytes"].items())
    lines = [f"model {report['model']} ({report['arch']}, {report['dtype']}; weight bytes read per decode step: "
             f"{sizes}), threads {report['threads']}, prompt {report['prompt_len']}, decode "
             f"{report['decode_tokens']}; peers {', '.join(report['peers']) or 'none'} (each its own process, own "
             f"defaults; transformers dtype {report['hf_dtype']})",
             f"machine: {report['cpu_count']} cores, 1-minute load average {report['load_avg_1m_start']} at the "
             f"start, {report['load_avg_1m']} at the end; read probe {report['read_probe_gbps']} GB/s; "
             f"medians of {report['rounds']} interleaved rounds",
             f"{'batch':>5} {'engine':<15} {'prefill':>9} {'vs hf':>6} {'decode':>8} {'vs hf':>6} {'vs l.cpp':>8} "
             f"{'vs first':>8} {'GB/s':>6} {'% probe':>8}  (tokens/s; vs l.cpp: llama.cpp on the same format)"]
    for row in report["results"]:
        for label, ours in row["variants"].items():
            lines.append(f"{row['batch']:>5} {label:<15} {ours['prefill_tokens_per_s']:>9.1f} "
                         f"{ours.get('prefill_vs_hf', nan):>6.2f} {ours['decode_tokens_per_s']:>8.1f} "
                         f"{ours.get('decode_vs_hf', nan):>6.2f} {ours.get('decode_vs_llamacpp', nan):>8.2f} "
                         f"{ours['decode_vs_first']:>8.2f} {ours['weight_gbps']:>6.1f} "
                         f"{100 * ours['roofline_fraction']:>7.0f}%")
        for label, peer in row["peers"].items():
            lines.append(f"{row['batch']:>5} {label:<15} {peer['prefill_tokens_per_s']:>9.1f} {'':>6} "
                         f"{peer['decode_tokens_per_s']:>8.1f}")
    lines.append("per round (prefill / decode tokens/s):")
    for row in report["results"]:
        for label, values in [*row["variants"].items(), *row["peers"].items()]:
            lines.append(f"  batch {row['batch']} {label}: {values['prefill_all']} / {values['decode_all']}")
    return "\n".join(lines)
