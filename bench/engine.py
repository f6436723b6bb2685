"""`c2cserve bench engine`: prefill and decode tokens/s of our engine vs transformers.

Both run in this process, on the same checkpoint, with the same torch thread count.
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
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="also write the report to this file")


def run(args) -> int:
    import torch

    from services.errors import InvalidRequest

    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.prompt_len < 1 or args.decode_tokens < 1:
        raise InvalidRequest("--batch-sizes, --prompt-len and --decode-tokens must be positive")
    engine, model_id = _make_engine(args, max(batch_sizes))
    threads = torch.get_num_threads()
    vocab = min(engine.tokenizer(model_id).vocab_size, engine.runner.slots[model_id].config.vocab_size)
    prompts = _random_prompts(max(batch_sizes), args.prompt_len, vocab)
    rows = []
    for batch in batch_sizes:  # warm-up on the same shapes first: compilation, per-shape autotune
        _ours(engine, model_id, prompts[:batch], args.prompt_len, 2)
        row = {"batch": batch, "ours": _ours(engine, model_id, prompts[:batch], args.prompt_len, args.decode_tokens)}
        rows.append(row)
    if not args.no_hf:
        hf_model = _hf_model(args.model, args.hf_dtype)
        for row in rows:
            _hf(hf_model, prompts[: row["batch"]], 2)
            row["hf"] = _hf(hf_model, prompts[: row["batch"]], args.decode_tokens)
            row["prefill_ratio"] = row["ours"]["prefill_tokens_per_s"] / row["hf"]["prefill_tokens_per_s"]
            row["decode_ratio"] = row["ours"]["decode_tokens_per_s"] / row["hf"]["decode_tokens_per_s"]
    config = engine.runner.slots[model_id].config
    report = {"model": str(args.model), "arch": config.arch, "dtype": config.dtype, "threads": threads,
              "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
              "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
              "hf_dtype": None if args.no_hf else args.hf_dtype, "results": rows}
    text = json.dumps(report) if args.json else _table(report)
    print(text)
    if args.out:
        command = "c2cserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.out).write_text(f"$ {command}\n{text}\n")
    return 0


def _make_engine(args, max_batch: int):
    from worker.engine import Engine, EngineConfig

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


def _hf_model(model_dir, dtype: str):
    import torch
    import transformers

    torch_dtype = "auto" if dtype == "auto" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    return model.eval()


def _hf(model, prompts, decode_tokens: int) -> dict:
    """transformers: one forward over the prompt batch, then per-token forwards (greedy)."""
    import torch

    input_ids = torch.tensor(prompts)  # [B, P]
    with torch.inference_mode():
        start_s = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        prefill_s = time.perf_counter() - start_s
        past, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        start_s = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=next_ids, past_key_values=past, use_cache=True)
            past, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - start_s
    batch, prompt_len = input_ids.shape
    return {"prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_tokens_per_s": batch * decode_tokens / decode_s,
            "decode_step_ms": 1000 * decode_s / decode_tokens}


def _table(report: dict) -> str:
    lines = [f"model {report['model']} ({report['arch']}, {report['dtype']}), threads {report['threads']}, "
             f"prompt {report['prompt_len']}, decode {report['decode_tokens']}, transformers dtype {report['hf_dtype']}",
             f"machine: {report['cpu_count']} cores, 1-minute load average {report['load_avg_1m']} at the end",
             f"{'batch':>5} {'ours prefill':>13} {'hf prefill':>11} {'ratio':>6} "
             f"{'ours decode':>12} {'hf decode':>10} {'ratio':>6}  (tokens/s)"]
    for row in report["results"]:
        ours, hf = row["ours"], row.get("hf")
        lines.append(f"{row['batch']:>5} {ours['prefill_tokens_per_s']:>13.1f} "
                     f"{hf['prefill_tokens_per_s'] if hf else float('nan'):>11.1f} {row.get('prefill_ratio', float('nan')):>6.2f} "
                     f"{ours['decode_tokens_per_s']:>12.1f} {hf['decode_tokens_per_s'] if hf else float('nan'):>10.1f} "
                     f"{row.get('decode_ratio', float('nan')):>6.2f}")
    return "\n".join(lines)
