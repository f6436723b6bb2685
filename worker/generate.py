"""`c2cserve generate`: run one request through the engine, streaming text or as JSON.

Errors a user can cause (missing checkpoint, prompt too long, bad sampling values) are
`C2CError`s, printed by the CLI as one line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (Hugging Face layout)")
    parser.add_argument("--prompt", required=True, help="prompt text (the user message with --chat)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    parser.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--residency", choices=("host", "load"), default="host",
                        help="map weights from the host store (default) or copy them in")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda: the device engine on the GPU (NUMBA_ENABLE_CUDASIM=1: simulated)")
    parser.add_argument("--rho", type=float, default=None,
                        help="cuda, host residency: fraction of weight bytes cached in device memory")
    parser.add_argument("--quantize", choices=("int8", "q4"), default=None,
                        help="quantize the projection matrices at registration: int8 per channel or q4 "
                             "(4-bit groups of 32); default C2C_QUANTIZE, else none")


def run(args) -> int:
    from worker.engine import Engine, EngineConfig, SamplingParams

    model_dir = Path(args.model)
    engine = Engine(EngineConfig(residency=args.residency, num_threads=args.threads, device=args.device,
                                 quantize=args.quantize))
    model_id = model_dir.resolve().name
    load_start_s = time.perf_counter()
    engine.add_model(model_id, model_dir, preload=True)
    engine.set_control(rho=args.rho)
    load_s = time.perf_counter() - load_start_s
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    start_s = time.perf_counter()
    engine.add_request("generate", model_id, params=params, **prompt)
    token_ids, text, token_times, last = [], [], [], None
    while engine.has_work():
        for out in engine.step():
            now_s = time.perf_counter()
            token_times += [now_s] * len(out.new_token_ids)
            token_ids += out.new_token_ids
            text.append(out.new_text)
            if not args.json and out.new_text:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            last = out
    if last.finish_reason == "error":
        print(f"c2cserve: error: {last.error}", file=sys.stderr)
        return 1
    result = _summary(token_ids, "".join(text), token_times, start_s, last, load_s)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n[{result['finish_reason']}: {len(token_ids)} tokens, ttft {result['ttft_s']:.3f} s, "
              f"decode {result['decode_tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
    return 0


def _summary(token_ids, text, token_times, start_s, last, load_s) -> dict:
    ttft_s = token_times[0] - start_s if token_times else None
    decode_s = token_times[-1] - token_times[0] if len(token_times) > 1 else 0.0
    return {
        "token_ids": token_ids,
        "text": text,
        "ttft_s": ttft_s,
        "decode_tokens_per_s": (len(token_times) - 1) / decode_s if decode_s > 0 else None,
        "num_prompt_tokens": last.num_prompt_tokens,
        "finish_reason": last.finish_reason,
        "load_s": load_s,
    }
