"""A loading system's engine start-up, measured on this machine: a fresh process imports
the engine, builds it, registers a model, loads the compiled kernels and answers one
token (weights of a tiny model, so the weight copy itself is negligible). The simulator's
realistic ServerlessLLM-like baseline pays this per cold start (`c2cserve sim
--sllm-init-s`), on top of its loader.

usage: python bench/engine_start.py [MODEL_DIR] [--rounds N]; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
from worker.engine import Engine, SamplingParams
e = Engine(); e.add_model("m", {model!r}); e.warmup()
e.generate("m", "hello", SamplingParams(max_tokens=1, temperature=0.0))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir or str(Path(tmp) / "tiny-llama")
        if args.model_dir is None:
            subprocess.run([sys.executable, "-m", "services.cli", "models", "synth", "--arch", "llama",
                            "--preset", "tiny", "--out", model], check=True, cwd=root, stdout=subprocess.DEVNULL)
        runs = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", CHILD.format(model=model)], check=True, cwd=root)
            runs.append(time.perf_counter() - start)
    print(json.dumps({"runs_s": [round(r, 2) for r in runs], "median_s": round(statistics.median(runs), 2),
                      "min_s": round(min(runs), 2), "loadavg": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
