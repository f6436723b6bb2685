"""The transformers peer of `c2cserve bench engine`, in a process of its own.

Started by bench/engine.py with transformers' own defaults: no OMP_WAIT_POLICY=PASSIVE
(c2cserve's processes set it; it slowed transformers by ~25%), same torch thread count.
Protocol on stdin/stdout, one JSON object per line: it loads the model, prints
{"ready": true}, then answers each {"prompts": [[ids]], "decode_tokens": n} with
{"prefill_tokens_per_s", "decode_tokens_per_s", "decode_step_ms"}; EOF ends it.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    import torch
    import transformers

    model_dir, dtype, threads = argv[0], argv[1], int(argv[2])
    torch.set_num_threads(threads)
    torch_dtype = "auto" if dtype == "auto" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(run_one(model, job["prompts"], job["decode_tokens"])), flush=True)
    return 0


def run_one(model, prompts, decode_tokens: int) -> dict:
    """One forward over the prompt batch (prefill), then per-token forwards (greedy)."""
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
