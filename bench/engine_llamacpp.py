"""The llama.cpp peer of `c2cserve bench engine` (llama-cpp-python), in a process of its own.

Run by bench/engine.py with the interpreter that has `llama_cpp` installed (its own venv
if need be: this file needs only the standard library, numpy and llama_cpp), with llama.cpp's
own defaults but the same thread count. Protocol on stdin/stdout as bench/engine_hf.py:
argv GGUF_PATH THREADS CONTEXT; prints {"ready": true} once loaded, then answers each
{"prompts": [[ids]], "decode_tokens": n} with {"prefill_tokens_per_s",
"decode_tokens_per_s", "decode_step_ms"} for a single prompt (batch 1: the high-level
API runs one sequence), or {"skipped": "..."} for a batch; EOF ends it.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    from llama_cpp import Llama

    path, threads, context = argv[0], int(argv[1]), int(argv[2])
    llm = Llama(model_path=path, n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if len(job["prompts"]) != 1:
            print(json.dumps({"skipped": "llama-cpp-python runs one sequence at a time"}), flush=True)
            continue
        print(json.dumps(run_one(llm, job["prompts"][0], job["decode_tokens"])), flush=True)
    return 0


def run_one(llm, prompt: list[int], decode_tokens: int) -> dict:
    """One eval of the prompt (prefill), then one eval per greedy token."""
    llm.reset()
    start_s = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - start_s
    start_s = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([last_logits(llm).argmax().item()])
    decode_s = time.perf_counter() - start_s
    return {"prefill_tokens_per_s": len(prompt) / prefill_s, "decode_tokens_per_s": decode_tokens / decode_s,
            "decode_step_ms": 1000 * decode_s / decode_tokens}


def last_logits(llm):
    """The last evaluated token's logits [vocab] (the high-level API keeps them only with
    logits_all; llama.cpp's context holds the last batch's outputs)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
