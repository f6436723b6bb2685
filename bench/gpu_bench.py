"""The device engine's numbers on one GPU (run by bench/gpu_check.sh; `--sim`: tiny sizes
under NUMBA_ENABLE_CUDASIM=1, to check the script itself on a machine with no GPU).

1. Link and device bandwidth (pinned host->device copy; device copy, read + write), then
   HybridGEMM GB/s (weight bytes / kernel time, decode M=1, output-stationary) at
   ρ in {0, .25, .5, .75, 1} and at ρ* = B_dev / (B_dev + B_link); target: the best
   ≥ 85% of B_dev + B_link.
2. A 1B-class synth Llama (synth preset "1b") through the device engine: decode tokens/s
   at batch 1 and 8, and a cold start's added latency (first request's TTFT less a warm
   one's), for residency host at ρ = 0 and ρ = 1, load, and dedicated (load, preloaded);
   target: host at ρ = 1 within 10% of dedicated.

Writes <out>/gpu_bench.json and <out>/gpu_bench.txt (command line on top).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

RHOS = [0.0, 0.25, 0.5, 0.75, 1.0]
SIZES = {  # GEMM weight [N, K], synth preset, decode tokens per request, batch sizes, copy bytes
    "gpu": dict(gemm=(28672, 4096), preset="1b", tokens=32, batches=(1, 8), copy_bytes=1 << 30, repeats=10),
    "sim": dict(gemm=(16, 16), preset="micro", tokens=2, batches=(1, 2), copy_bytes=1 << 12, repeats=1),
}
MODES = [("host rho=0", "host", 0.0), ("host rho=1", "host", 1.0), ("load", "load", None),
         ("dedicated", "dedicated", None)]


def gemm_rows(size: dict, link_gbps: float, dev_gbps: float) -> list[dict]:
    import numpy as np
    import torch
    from numba import cuda

    from bench.kernels import _time_hybrid
    from c2c_kernels.cuda_backend import HybridWeight

    n, k = size["gemm"]
    hw = HybridWeight(torch.randn(n, k).to(torch.bfloat16), name="bench")
    dx = cuda.to_device(np.random.standard_normal((1, k)).astype(np.float32))
    dy = cuda.device_array((1, n), np.float32)
    rho_star = dev_gbps / (dev_gbps + link_gbps)
    rows = []
    for rho in [*RHOS, rho_star]:
        hw.set_cached_rows(round(rho * n))
        t_s = _time_hybrid("os", dx, hw, dy, None, size["repeats"])
        rows.append({"rho": rho, "us": t_s * 1e6, "gbps": n * k * 2 / t_s / 1e9})
    return rows


def engine_rows(size: dict, model_dir: Path, rows: list[dict]) -> None:
    """Appends one row per mode as it finishes (a later failure keeps the earlier rows)."""
    _decode_tok_s(_engine(model_dir, "host", 0.0), 2, 2)  # compiles every kernel before any timing
    for name, residency, rho in MODES:
        engine = _engine(model_dir, residency, rho)
        cold_s = _ttft_s(engine)   # maps (host) or copies (load) the model; dedicated did at add_model
        warm_s = _ttft_s(engine)
        row = {"mode": name, "cold_start_added_s": cold_s - warm_s,
               "cached_fraction": engine.stats().cached_fraction.get("m", 0.0)}
        for batch in size["batches"]:
            row[f"decode_tok_s_batch{batch}"] = _decode_tok_s(engine, batch, size["tokens"])
        rows.append(row)
        del engine
        gc.collect()  # the model's device memory back before the next mode sizes its tile cache


def _engine(model_dir: Path, residency: str, rho: float | None):
    from worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cuda", residency="load" if residency == "dedicated" else residency))
    engine.add_model("m", model_dir, preload=residency == "dedicated")
    engine.set_control(rho=rho)
    return engine


def _ttft_s(engine) -> float:
    from worker.engine import SamplingParams

    start_s = time.perf_counter()
    engine.generate("m", "The quick brown fox jumps over", SamplingParams(max_tokens=1, temperature=0.0))
    return time.perf_counter() - start_s


def _decode_tok_s(engine, batch: int, num_tokens: int) -> float:
    """Tokens/s of the decode steps after every request of the batch has its first token."""
    from worker.engine import SamplingParams

    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", "m", prompt="Once upon a time", params=params)
    num_first, first_s, num_decoded = 0, None, 0
    while engine.has_work():
        outputs = engine.step()
        if first_s is None:
            num_first += sum(1 for o in outputs if o.num_generated_tokens == 1)
            first_s = time.perf_counter() if num_first == batch else None
        else:
            num_decoded += sum(len(o.new_token_ids) for o in outputs)
    return num_decoded / (time.perf_counter() - first_s)


def render(result: dict) -> str:
    copy, target = result["copy"], result["link_gbps"] + result["device_gbps"]
    lines = [f"device: {result['device']}",
             f"host->device (pinned copy) {copy['h2d_gbps']:.1f} GB/s; device copy {copy['d2d_gbps']:.1f} GB/s "
             "(read + write)",
             f"HybridGEMM decode (M=1) on W {result['gemm_shape']} bf16: GB/s = weight bytes / time",
             f"{'rho':>6}{'us':>10}{'GB/s':>9}{'of dev+link':>13}"]
    lines += [f"{r['rho']:>6.3f}{r['us']:>10.1f}{r['gbps']:>9.1f}{r['gbps'] / target:>12.0%}" for r in result["gemm"]]
    best = max(r["gbps"] for r in result["gemm"])
    lines.append(f"best {best:.1f} GB/s = {best / target:.0%} of dev + link {target:.1f} GB/s (target >= 85%)")
    if "engine_error" in result:
        lines.append(f"\ndevice engine FAILED: {result['engine_error']}")
    if not result.get("engine"):
        return "\n".join(lines)
    batches = [k for k in result["engine"][0] if k.startswith("decode_tok_s")]
    lines.append(f"\ndevice engine, synth llama {result['preset']}: decode tokens/s and cold-start added latency")
    lines.append(f"{'mode':<12}{'cached':>8}" + "".join(f"{k.removeprefix('decode_tok_s_'):>10}" for k in batches)
                 + f"{'cold +s':>9}")
    for r in result["engine"]:
        lines.append(f"{r['mode']:<12}{r['cached_fraction']:>8.2f}" + "".join(f"{r[k]:>10.1f}" for k in batches)
                     + f"{r['cold_start_added_s']:>9.3f}")
    by_mode = {r["mode"]: r for r in result["engine"]}
    for k in batches if {"host rho=1", "dedicated"} <= set(by_mode) else []:
        ratio = by_mode["host rho=1"][k] / by_mode["dedicated"][k]
        lines.append(f"host rho=1 / dedicated, {k}: {ratio:.2f} (target >= 0.90)")
    return "\n".join(lines)


def _write(out: Path, command: str, result: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps({"command": command, **result}, indent=2))
    text = render(result)
    (out / "gpu_bench.txt").write_text(f"$ {command}\n{text}\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu", help="folder for gpu_bench.json / .txt")
    parser.add_argument("--sim", action="store_true", help="tiny sizes, under NUMBA_ENABLE_CUDASIM=1")
    args = parser.parse_args(argv)
    if args.sim != (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"):
        print("gpu_bench: --sim needs NUMBA_ENABLE_CUDASIM=1 (and a GPU run needs it unset)", file=sys.stderr)
        return 2
    size = SIZES["sim" if args.sim else "gpu"]
    from numba import cuda

    from bench.kernels import gpu_copy_gbps
    from worker.synth import synth_model

    device = cuda.get_current_device()
    copy = gpu_copy_gbps(size["repeats"], size["copy_bytes"])
    link_gbps, device_gbps = copy["h2d_gbps"], copy["d2d_gbps"]
    result = {"device": str(getattr(device, "name", "simulator")), "copy": copy, "link_gbps": link_gbps,
              "device_gbps": device_gbps, "gemm_shape": list(size["gemm"]), "preset": size["preset"]}
    result["gemm"] = gemm_rows(size, link_gbps, device_gbps)
    out = Path(args.out)
    command = "python -m bench.gpu_bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    _write(out, command, result)  # the bandwidth numbers survive a failure below
    result["engine"], status = [], 0
    shm = Path("/dev/shm")  # the host store in shared memory, as a worker has it
    try:
        with (tempfile.TemporaryDirectory() as tmp,
              tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as store):
            os.environ["C2C_HOST_STORE"] = store
            start_s = time.perf_counter()
            model_dir = synth_model("llama", size["preset"], Path(tmp) / "model")
            result["synth_s"] = time.perf_counter() - start_s
            engine_rows(size, model_dir, result["engine"])
    except Exception as exc:  # one prepared GPU run: keep what was measured, and why it stopped
        result["engine_error"] = f"{type(exc).__name__}: {exc}"
        status = 1
    print(_write(out, command, result))
    return status


if __name__ == "__main__":
    sys.exit(main())
