"""Does llama.cpp read our GGUF export as the model it is? Its logits vs ours, same prompt.

usage: python -m bench.gguf_llamacpp_check LLAMACPP_PYTHON [OUT_DIR]

Synthesizes tiny llama and qwen2 checkpoints (fp32), writes each as an F32 GGUF the way
llama.cpp's converter does (bench/gguf_export.py: names, q/k row permutation, llama3
rope_freqs, tokenizer), runs llama.cpp on it in LLAMACPP_PYTHON (an interpreter with
llama-cpp-python) and prints the largest logit difference from our engine's fp32 forward
on the checkpoint. Agreement checks the conventions that worker/gguf_tensors.py reverses
against llama.cpp itself, not only against our own writer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = list(range(5, 25))
_LLAMACPP = """
import json, sys
import numpy as np
from llama_cpp import Llama
sys.path.insert(0, sys.argv[2])
from engine_llamacpp import last_logits
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
llm.eval(json.loads(sys.argv[3]))
print(json.dumps(last_logits(llm).tolist()))
"""


def main(argv: list[str]) -> int:
    import numpy as np

    from bench.gguf_export import write_gguf
    from worker.checkpoint import load_checkpoint
    from worker.forward_batch import ForwardBatch
    from worker.model import CausalLM, KVCache
    from worker.synth import synth_model

    python, out = argv[0], Path(argv[1] if len(argv) > 1 else tempfile.mkdtemp())
    for arch in ("llama", "qwen2"):
        model_dir = synth_model(arch, "tiny", out / arch)
        path = write_gguf(model_dir, out / f"{arch}.gguf")
        config, weights = load_checkpoint(model_dir)
        kv = KVCache.allocate(config, 16, 4)
        ours = CausalLM(config, weights).forward(ForwardBatch.build([PROMPT], [0], [list(range(16))], 4), kv)[-1]
        done = subprocess.run([python, "-c", _LLAMACPP, str(path), str(Path(__file__).parent), json.dumps(PROMPT)],
                              capture_output=True, text=True, check=True)
        theirs = np.array(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32)
        print(f"{arch}: argmax ours {int(ours.argmax())} llama.cpp {int(theirs.argmax())}; max |logit diff| "
              f"{float(np.abs(theirs - ours.numpy()).max()):.2e} (max |logit| {float(ours.abs().max()):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
