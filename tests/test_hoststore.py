"""Host store: zero-copy sharing across processes, racing copy-in, LRU eviction, in-use refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from services.errors import CheckpointError, ModelNotFound, NoCapacity
from worker.checkpoint import load_checkpoint
from worker.forward_batch import ForwardBatch
from worker.hoststore import HostStore
from worker.model import CausalLM, KVCache

# A child process: maps the model, reads every byte, then answers "stats" lines with the
# /proc/self/smaps figures (kB) of its weights.bin mapping, until "quit".
CHILD = textwrap.dedent("""
    import json, sys
    from worker.hoststore import HostStore

    def mapping_stats(suffix):
        stats, inside = {}, False
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                inside = line.rstrip().endswith(suffix)
            elif inside and fields[0].rstrip(":") in ("Rss", "Pss", "Shared_Clean", "Shared_Dirty",
                                                                  "Private_Clean", "Private_Dirty"):
                key = fields[0].rstrip(":")
                stats[key] = stats.get(key, 0) + int(fields[1])
        return stats

    store = HostStore(sys.argv[1])
    model = store.open(sys.argv[2])
    checksum = sum(float(t.float().sum()) for t in model.tensors().values())
    print(json.dumps({"ready": True, "checksum": checksum}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps(mapping_stats(str(model.path / "weights.bin"))), flush=True)
    model.close()
""")

RACER = textwrap.dedent("""
    import json, sys
    from worker.hoststore import HostStore
    store = HostStore(sys.argv[1])
    sys.stdin.readline()                      # barrier: both racers start copying together
    key = store.make_resident(sys.argv[2])
    print(json.dumps({"key": key, "copied": store.last_copied}), flush=True)
""")


class Child:
    def __init__(self, script: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1])

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"child exited with {self.proc.wait()}"
        return json.loads(line)

    def ask(self, line: str) -> dict:
        self.send(line)
        return self.read()

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def store():
    root = Path("/dev/shm") / f"c2c-hs-{uuid.uuid4().hex[:8]}"
    yield HostStore(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from worker.synth import synth_model
    return synth_model("llama", "small", tmp_path_factory.mktemp("small-llama"), seed=3)


def test_tensors_equal_checkpoint_and_copy_is_once(store, tiny_model):
    model_dir = tiny_model("qwen2_moe")
    key = store.make_resident(model_dir)
    assert store.last_copied
    assert store.make_resident(model_dir) == key and not store.last_copied
    _, expected = load_checkpoint(model_dir)
    with store.open(key) as resident:
        tensors = resident.tensors()
        assert resident.config.arch == "qwen2_moe" and resident.model_dir == Path(model_dir).resolve()
        assert set(expected) <= set(tensors)
        for name, tensor in expected.items():
            assert torch.equal(tensors[name], tensor), name
        # fused views: the parts are row ranges of one contiguous matrix (no extra bytes)
        attn, mlp = "model.layers.0.self_attn", "model.layers.1.mlp"
        qkv = tensors[f"{attn}.qkv_proj.weight"]
        assert qkv.data_ptr() == tensors[f"{attn}.q_proj.weight"].data_ptr() and qkv.data_ptr() % 64 == 0
        assert torch.equal(qkv, torch.cat([expected[f"{attn}.{n}_proj.weight"] for n in "qkv"]))
        assert torch.equal(tensors[f"{attn}.qkv_proj.bias"],
                           torch.cat([expected[f"{attn}.{n}_proj.bias"] for n in "qkv"]))
        assert torch.equal(tensors[f"{mlp}.gate_up_proj.weight"],
                           torch.cat([expected[f"{mlp}.gate_proj.weight"], expected[f"{mlp}.up_proj.weight"]]))
        assert "model.layers.0.mlp.experts.3.gate_up_proj.weight" in tensors
        assert "model.layers.0.mlp.shared_expert.gate_up_proj.weight" in tensors
    assert store.resident_models() == [(key, resident.nbytes)]
    assert not any(p.name.startswith(".tmp") for p in store.models_dir.iterdir())


def test_two_processes_share_one_physical_copy(store, small_model):
    key = store.make_resident(small_model)
    nbytes_kb = store.resident_models()[0][1] / 1024
    first = Child(CHILD, store.root, key)
    second = None
    try:
        assert first.read()["ready"]
        alone = first.ask("stats")
        assert alone["Rss"] >= 0.95 * nbytes_kb            # every page touched
        assert alone["Pss"] >= 0.95 * alone["Rss"]         # sole mapper: pays for all of it
        second = Child(CHILD, store.root, key)
        assert second.read()["ready"]
        both = [first.ask("stats"), second.ask("stats")]
        for stats in both:
            assert stats["Rss"] >= 0.95 * nbytes_kb
            # shmem pages count as dirty; what matters is shared, not private
            shared = stats.get("Shared_Clean", 0) + stats.get("Shared_Dirty", 0)
            private = stats.get("Private_Clean", 0) + stats.get("Private_Dirty", 0)
            assert shared >= 0.95 * stats["Rss"] and private == 0    # the same pages, no copies
            assert 0.4 * stats["Rss"] <= stats["Pss"] <= 0.6 * stats["Rss"]  # each pays half
        assert not store.evict(key)                        # in use by the children
        assert store.is_in_use(key)
    finally:
        for child in (first, second):
            if child is not None:
                child.send("quit")
                child.finish()
    assert not store.is_in_use(key)
    assert store.evict(key)
    assert store.resident_models() == []


def test_racing_processes_copy_once(store, tiny_model):
    model_dir = tiny_model("mistral")
    racers = [Child(RACER, store.root, model_dir) for _ in range(2)]
    try:
        for racer in racers:
            racer.send("go")
        results = [racer.read() for racer in racers]
    finally:
        for racer in racers:
            racer.finish()
    assert results[0]["key"] == results[1]["key"]
    assert sorted(r["copied"] for r in results) == [False, True]
    assert len(store.resident_models()) == 1


def test_lru_eviction_and_in_use_refusal(tiny_model):
    dirs = [tiny_model("llama", seed=s) for s in (10, 11, 12)]
    root = Path("/dev/shm") / f"c2c-hs-{uuid.uuid4().hex[:8]}"
    probe = HostStore(root / "probe")
    probe.make_resident(dirs[0])
    model_bytes = probe.resident_models()[0][1]
    store = HostStore(root / "store", capacity_bytes=int(2.5 * model_bytes))
    try:
        a, b = store.make_resident(dirs[0]), store.make_resident(dirs[1])
        store.open(a).close()                              # a is now the most recently used
        c = store.make_resident(dirs[2])                   # evicts b, the LRU
        assert [k for k, _ in store.resident_models()] == [a, c]
        with store.open(a), store.open(c):
            assert not store.evict(a)
            with pytest.raises(NoCapacity, match="in use"):
                store.make_resident(dirs[1])               # everything resident is in use
        assert store.make_resident(dirs[1]) == b           # now the LRU (a) can go
        assert [k for k, _ in store.resident_models()] == [c, b]
        with pytest.raises(NoCapacity, match="capacity"):
            HostStore(root / "tiny", capacity_bytes=model_bytes // 2).make_resident(dirs[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_bad_checkpoint_and_unknown_key(store, tiny_model, tmp_path):
    with pytest.raises(ModelNotFound, match="not resident"):
        store.open("no-such-model-123")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_model("llama") / name, bad / name)          # no weights
    with pytest.raises(CheckpointError, match="model.safetensors"):
        store.make_resident(bad)
    assert store.resident_models() == []


@pytest.mark.parametrize("arch", ["mixtral", "qwen2"])
def test_model_on_fused_store_tensors_matches_checkpoint(store, tiny_model, arch):
    """Opened by its folder; the model runs on the fused views and gives the same logits."""
    model_dir = tiny_model(arch)
    config, weights = load_checkpoint(model_dir)
    batch = ForwardBatch.build([[3, 1, 4, 1, 5, 9, 2, 6]], [0], [[0, 1]], 4, logits="all")
    want = CausalLM(config, weights).forward(batch, KVCache.allocate(config, 2, 4))
    with store.open(model_dir) as resident:
        assert resident.key == store.resident_models()[0][0]
        model = CausalLM(resident.config, resident.tensors())
        assert all(len(layer.attn.qkv) == 1 for layer in model.layers)      # one q|k|v kernel call
        got = model.forward(batch, KVCache.allocate(config, 2, 4))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
