"""Where a batch-1 decode step's time goes: per kind of call, for each weight format.

usage: python -m bench.decode_profile --model DIR [--quantize none,int8,q4] [--steps 32]
       [--prompt-len 64] [--threads N]

Runs our engine once per weight format (in this process, one after another) and times
every call of the model's forward pass by kind: the projections (q|k|v, o, gate|up, down,
LM head: ms per step and GB/s of their weight bytes), paged attention, norms, RoPE, the
rest of the forward (Python glue, embedding, residual adds) and the rest of the engine
step (scheduling, sampling, detokenizing). The timers add a few microseconds per call
(~10 calls a layer), so the "glue" share is an upper bound. Prints a table per format.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from contextlib import contextmanager


def weight_kinds(model) -> dict[int, tuple[str, int]]:
    """id(weight) -> (kind, bytes) for every projection the forward pass multiplies by."""
    import c2c_kernels as kernels

    def size(w) -> int:
        parts = w.tensors() if isinstance(w, kernels.QUANTIZED) else (w,)
        return sum(t.numel() * t.element_size() for t in parts)

    kinds = {id(model.lm_head): ("lm_head", size(model.lm_head))}
    for layer in model.layers:
        for w in layer.attn.qkv:
            kinds[id(w)] = ("qkv", size(w))
        kinds[id(layer.attn.o)] = ("o_proj", size(layer.attn.o))
        for w in layer.mlp.tensors() if layer.mlp is not None else ():
            kinds[id(w)] = ("down" if w is layer.mlp.down else "gate_up", size(w))
    return kinds


@contextmanager
def timed_calls(model, seconds: dict, nbytes: dict):
    """Time the model's linear calls by weight kind, and attention, norms and RoPE."""
    import c2c_kernels as kernels
    import worker.model as model_module

    kinds = weight_kinds(model)
    linear = model.linear

    def timed(name, fn):
        def call(*args, **kwargs):
            start_s = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds[name] += time.perf_counter() - start_s
            return out
        return call

    def timed_linear(x, w, bias=None):
        kind, size = kinds.get(id(w), ("other_linear", 0))
        nbytes[kind] += size
        return timed(kind, linear)(x, w, bias)

    patches = [(model_module, "paged_attention", "attention"), (kernels, "add_rms_norm", "norm"),
               (kernels, "rope_", "rope")]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    model.linear = timed_linear
    for obj, attr, name in patches:
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    try:
        yield
    finally:
        model.linear = linear
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)


def profile(args, quantize: str | None) -> dict:
    """Per kind: ms per decode step; plus GB/s of the projections and the step's total."""
    from bench.engine import _random_prompts
    from worker.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(num_threads=args.threads, quantize=quantize or ""))
    engine.add_model("m", args.model, preload=True)
    model = engine.runner.slots["m"].model
    prompt = _random_prompts(1, args.prompt_len, min(engine.tokenizer("m").vocab_size, model.config.vocab_size))[0]
    params = SamplingParams(max_tokens=args.steps + 4, temperature=0.0, ignore_eos=True)
    seconds, nbytes = defaultdict(float), defaultdict(int)
    for round_index in range(2):  # the first round warms up (kernel loading, first-shape work)
        engine.add_request(f"p{round_index}", "m", prompt_token_ids=prompt, params=params)
        engine.step()  # prefill
        engine.step()  # first decode step, untimed
        seconds.clear(), nbytes.clear()
        forward = model.forward
        with timed_calls(model, seconds, nbytes):
            model.forward = lambda *a, _f=forward: _timed_forward(_f, seconds, *a)
            start_s = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            total_s = time.perf_counter() - start_s
            del model.forward
        while engine.has_work():
            engine.step()
    per_step = {k: 1000 * v / args.steps for k, v in seconds.items()}
    forward_ms = per_step.pop("forward")
    per_step["forward_glue"] = forward_ms - sum(per_step.values())
    per_step["engine_outside_forward"] = 1000 * total_s / args.steps - forward_ms
    gbps = {k: nbytes[k] / args.steps / (per_step[k] / 1000) / 1e9 for k in nbytes if per_step.get(k)}
    return {"step_ms": 1000 * total_s / args.steps, "ms": per_step, "gbps": gbps,
            "read_bytes": model.read_bytes_per_step()}


def _timed_forward(forward, seconds, *args):
    start_s = time.perf_counter()
    out = forward(*args)
    seconds["forward"] += time.perf_counter() - start_s
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantize", default="none,int8,q4")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    print(f"batch-1 decode step profile, {args.steps} steps after a {args.prompt_len}-token prompt; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    for mode in args.quantize.split(","):
        result = profile(args, None if mode == "none" else mode)
        print(f"\n{mode}: {result['step_ms']:.2f} ms per step ({1000 / result['step_ms']:.1f} tok/s), "
              f"{result['read_bytes'] / 1e6:.0f} MB of weights read per step")
        for kind, ms in sorted(result["ms"].items(), key=lambda kv: -kv[1]):
            rate = f"  {result['gbps'][kind]:6.1f} GB/s" if kind in result["gbps"] else ""
            print(f"  {kind:<24} {ms:8.3f} ms  {100 * ms / result['step_ms']:5.1f}%{rate}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every c2cserve process (services/cli.py)
    raise SystemExit(main())
