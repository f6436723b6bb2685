"""Pipeline tests' helpers: deeper tiny checkpoints and streams run through a reconfiguration."""

from __future__ import annotations

import json
from pathlib import Path

from worker.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["hello there", "the quick brown fox jumps over the lazy dog", "a", "one two three four five six",
           "pipelines split layers", "seven eight nine", "stream number seven", "x y z"]


def deep_tiny(out: Path, arch: str, num_layers: int = 4) -> Path:
    """The tiny preset of `arch` with num_layers layers (3 stages need 3 at least)."""
    from worker.synth import SHARD_BYTES, synth_model
    from worker.synth_weights import write_weights

    synth_model(arch, "tiny", out)
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    if "max_window_layers" in config:
        config["max_window_layers"] = num_layers
    (out / "config.json").write_text(json.dumps(config))
    for f in out.glob("*.safetensors"):
        f.unlink()
    write_weights(out, 0, None, SHARD_BYTES)
    return out


def make_engine(model_dir: Path) -> Engine:
    engine = Engine(EngineConfig(block_size=4, kv_cache_bytes=1 << 20, num_threads=1))
    engine.add_model("m", model_dir)
    return engine


def switch_now(engine: Engine, specs, nats_url: str | None = None) -> None:
    """Reconfigure with no request running, and wait for the switch."""
    engine.reconfigure("m", specs, nats_url)
    while engine.is_reconfiguring("m"):
        engine.step()


def run_streams(engine: Engine, prompts=PROMPTS, params=GREEDY, at_step=None, max_steps: int = 10_000):
    """All prompts as concurrent streams -> {request_id: [token ids]}; at_step(engine, n)
    is called after step n (reconfigure mid-stream). Fails on an error or a repeated finish."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", "m", prompt=prompt, params=params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    finished: set[str] = set()
    for num_steps in range(1, max_steps + 1):
        if not engine.has_work():
            break
        for out in engine.step():
            assert out.error is None and out.request_id not in finished, out
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finished.add(out.request_id)
        if at_step is not None:
            at_step(engine, num_steps)
    assert finished == set(tokens), f"unfinished: {set(tokens) - finished}"
    return tokens

