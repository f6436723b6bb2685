"""Where the runner's memory lives: private copies in load mode, a recycled KV pool."""

from __future__ import annotations

from pathlib import Path

from worker.engine import Engine, EngineConfig, SamplingParams


def _mapping_of(address: int) -> str:
    """The pathname of the /proc/self/maps entry holding `address` ('' when anonymous)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else ""
    raise AssertionError(f"address {address:#x} is not mapped")


def test_load_mode_copies_weights_into_private_memory(tiny_model):
    engine = Engine(EngineConfig(residency="load"))
    engine.add_model("m", tiny_model("qwen2"), preload=True)
    model = engine.runner.slots["m"].model
    # a lazily read file mapping would name the checkpoint file here
    for tensor in (model.embed, model.lm_head, model.final_norm):
        assert ".safetensors" not in _mapping_of(tensor.data_ptr())


def test_host_mode_maps_weights_from_the_host_store(tiny_model, host_store_root):
    engine = Engine(EngineConfig(residency="host"))
    engine.add_model("m", tiny_model("qwen2"), preload=True)
    assert str(host_store_root) in _mapping_of(engine.runner.slots["m"].model.embed.data_ptr())


def test_kv_buffers_are_recycled_across_models(tiny_model):
    engine = Engine(EngineConfig(kv_cache_bytes=1 << 20))
    engine.warmup()
    pooled = engine.runner._free_kv_buffers[0].data_ptr()
    engine.add_model("a", tiny_model("llama"), preload=True)
    assert engine.runner.slots["a"].kv.k.data_ptr() == pooled    # the warm buffer, no new one
    greedy = SamplingParams(max_tokens=4, temperature=0)
    first = engine.generate("a", "Hello there", greedy).new_token_ids
    assert engine.evict("a")
    engine.add_model("b", tiny_model("qwen2"), preload=True)
    assert engine.runner.slots["b"].kv.k.data_ptr() == pooled    # a's buffer, reused
    engine.generate("b", "Hello there", greedy)
    # stale KV from another model must not leak into a fresh sequence
    assert engine.evict("b")
    engine.prewarm("a")
    assert engine.generate("a", "Hello there", greedy).new_token_ids == first


def _rss_bytes_of(address: int) -> int:
    """Resident bytes of the /proc/self/smaps mapping holding `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"address {address:#x} is not mapped")


def test_a_cold_start_faults_in_only_the_kv_it_uses(tiny_model):
    engine = Engine(EngineConfig(kv_cache_bytes=64 << 20))
    engine.add_model("m", tiny_model("llama"), preload=True)
    kv = engine.runner.slots["m"].kv
    assert _rss_bytes_of(kv.k.data_ptr()) < (1 << 20)   # nothing zeroed up front
    engine.generate("m", "Hello there", SamplingParams(max_tokens=4, temperature=0))
    assert _rss_bytes_of(kv.k.data_ptr()) < (4 << 20)   # a few blocks written, not 64 MiB
    assert float(kv.k.abs().sum()) > 0                  # and the written KV is really there
