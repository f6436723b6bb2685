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


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _resident_pages(address: int, num_bytes: int) -> set[int]:
    """Page numbers of [address, address + num_bytes) in RAM, from /proc/self/pagemap's
    present bit (exact for this range: /proc/self/smaps would count a merged neighbour
    mapping too)."""
    first, last = address // PAGE_BYTES, (address + num_bytes - 1) // PAGE_BYTES
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((last - first + 1) * 8)
    return {first + i for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)) if entry >> 63}


def _resident_bytes(address: int, num_bytes: int) -> int:
    return len(_resident_pages(address, num_bytes)) * PAGE_BYTES


def _pages_of_first_blocks(kv, num_blocks: int) -> set[int]:
    """Pages that KV blocks [0, num_blocks) of every layer's K and V lie in."""
    pages = set()
    for cache in (kv.k, kv.v):  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
        for layer in cache[:, :num_blocks]:
            start = layer.data_ptr()
            pages.update(range(start // PAGE_BYTES, (start + layer.nbytes - 1) // PAGE_BYTES + 1))
    return pages


def test_a_cold_start_faults_in_only_the_kv_it_uses(tiny_model):
    engine = Engine(EngineConfig(kv_cache_bytes=64 << 20))
    engine.add_model("m", tiny_model("llama"), preload=True)
    slot = engine.runner.slots["m"]
    buffer = (slot.kv_buffer.data_ptr(), slot.kv_buffer.numel())
    assert _resident_bytes(*buffer) < (1 << 20)          # nothing zeroed up front
    engine.generate("m", "Hello there", SamplingParams(max_tokens=4, temperature=0))
    assert 0 < _resident_bytes(*buffer) < (4 << 20)      # a few blocks written, not 64 MiB
    assert float(slot.kv.k.abs().sum()) > 0              # and the written KV is really there


def test_sequential_requests_touch_only_the_blocks_one_needs(tiny_model):
    """Freed KV blocks are reused last-in-first-out, so request after request lands in the
    same few hot pages; first-in-first-out reuse walked every block, faulting in the whole
    buffer (~1 GB of RSS for four models' 256 MiB caches)."""
    engine = Engine(EngineConfig(kv_cache_bytes=64 << 20))
    engine.add_model("m", tiny_model("llama"), preload=True)
    slot = engine.runner.slots["m"]
    block_size, num_blocks_used = engine.config.block_size, 0
    words = "the quick brown fox jumps over the lazy dog and runs far away".split()
    for i in range(40):
        out = engine.generate("m", " ".join(words[: 2 + i % 10]), SamplingParams(max_tokens=8, temperature=0))
        num_tokens = out.num_prompt_tokens + out.num_generated_tokens
        num_blocks_used = max(num_blocks_used, -(-num_tokens // block_size))
    resident = _resident_pages(slot.kv_buffer.data_ptr(), slot.kv_buffer.numel())
    assert resident and resident <= _pages_of_first_blocks(slot.kv, num_blocks_used)
    assert slot.num_blocks > 40 * num_blocks_used  # FIFO reuse would have walked past them


def test_an_evicted_models_kv_pages_go_back_to_the_os(tiny_model):
    engine = Engine(EngineConfig(kv_cache_bytes=8 << 20))
    engine.add_model("m", tiny_model("llama"), preload=True)
    buffer = engine.runner.slots["m"].kv_buffer
    engine.generate("m", "Hello there", SamplingParams(max_tokens=4, temperature=0))
    assert _resident_bytes(buffer.data_ptr(), buffer.numel()) > 0
    assert engine.evict("m")
    assert engine.runner._free_kv_buffers[-1] is buffer  # pooled, and holding no memory
    assert _resident_bytes(buffer.data_ptr(), buffer.numel()) == 0
