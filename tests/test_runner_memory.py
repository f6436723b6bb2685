"""Where the runner's memory lives: private copies in load mode, a recycled KV pool."""

from __future__ import annotations

import os
import struct
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


def _resident_bytes(address: int, num_bytes: int) -> int:
    """Bytes of [address, address + num_bytes) in RAM, from /proc/self/pagemap's present bit
    (exact for this range: /proc/self/smaps would count a merged neighbour mapping too)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = address // page, (address + num_bytes - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((last - first + 1) * 8)
    present = sum(1 for (entry,) in struct.iter_unpack("<Q", entries) if entry >> 63)
    return present * page


def test_a_cold_start_faults_in_only_the_kv_it_uses(tiny_model):
    engine = Engine(EngineConfig(kv_cache_bytes=64 << 20))
    engine.add_model("m", tiny_model("llama"), preload=True)
    slot = engine.runner.slots["m"]
    buffer = (slot.kv_buffer.data_ptr(), slot.kv_buffer.numel())
    assert _resident_bytes(*buffer) < (1 << 20)          # nothing zeroed up front
    engine.generate("m", "Hello there", SamplingParams(max_tokens=4, temperature=0))
    assert 0 < _resident_bytes(*buffer) < (4 << 20)      # a few blocks written, not 64 MiB
    assert float(slot.kv.k.abs().sum()) > 0              # and the written KV is really there
