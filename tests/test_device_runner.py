"""The device engine (EngineConfig.device="cuda") under Numba's CUDA simulator (or on a GPU).

The whole forward pass runs on (simulated) device arrays: logits equal the CPU engine's,
greedy tokens equal for a dense and a mixture-of-experts model, prefill in chunks equals
prefill at once, ρ in {0, 0.5, 1} and "load" residency give the same tokens, a step
moves only the packed ids in and the sampled ids out, and a request that samples or wants
logprobs gets its logits row back and the host's sampler. Models are the synth "micro"
preset (hidden 16, vocab 272): every simulated thread is a Python thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _has_gpu() -> bool:
    from c2c_kernels.cuda_backend import gpu_available

    return not IN_SIM and gpu_available()


ON_DEVICE = IN_SIM or _has_gpu()  # the tests below run in this process (else in a simulator's)
on_device = pytest.mark.skipif(not ON_DEVICE, reason="runs inside test_simulator_subprocess")
PROMPT = "hello world"
CACHE_BYTES = 1 << 20


@pytest.fixture(autouse=True)
def prefill_weight_stationary():
    """Prefill (M > 1) through HybridGEMM's weight-stationary kernel, decode through the
    output-stationary one, so both run on the device engine."""
    import c2c_kernels as kernels

    threshold = kernels.decode_threshold()
    kernels.set_decode_threshold(1)
    yield
    kernels.set_decode_threshold(threshold)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """micro(arch) -> a bf16 checkpoint of the synth micro preset (cached)."""
    from worker.synth import synth_model

    made = {}

    def make(arch: str):
        if arch not in made:
            made[arch] = synth_model(arch, "micro", tmp_path_factory.mktemp(arch), seed=1)
        return made[arch]

    return make


def _engine(model_dir, **config):
    from worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(**config))
    engine.add_model("m", model_dir, preload=True)
    return engine


def _greedy(engine, prompt=PROMPT):
    """Two greedy tokens: a prefill and a decode step."""
    from worker.engine import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    return engine.generate("m", prompt, params).new_token_ids


@pytest.mark.skipif(ON_DEVICE, reason="this is the simulator subprocess itself, or a GPU runs them")
def test_simulator_subprocess(run_in_cuda_simulator):
    assert "10 passed" in run_in_cuda_simulator(__file__)


@on_device
def test_logits_equal_cpu_and_chunked_prefill_equals_one_shot(micro):
    from worker.device_model import pack_step
    from worker.forward_batch import ForwardBatch
    from worker.model import KVCache

    model_dir = micro("llama")
    cpu, dev = _engine(model_dir), _engine(model_dir, device="cuda", device_cache_bytes=CACHE_BYTES)
    ids = cpu.tokenize_request("m", PROMPT)
    block_size, config = cpu.config.block_size, cpu.runner.slots["m"].config
    batch = ForwardBatch.build([ids], [0], [[0, 1]], block_size)
    kv = KVCache.allocate(config, 4, block_size)
    cpu_logits = cpu.runner.slots["m"].model.forward(batch, kv)              # [1, V]

    model = dev.runner.slots["m"].model
    def device_logits(new_tokens, num_cached, table):
        step = ForwardBatch.build([new_tokens], [num_cached], [table], block_size)
        packed, layout = pack_step(step, [0])
        return torch.from_numpy(model.forward(dev.runner.copies.to_device(packed), layout).copy_to_host())

    one_shot = device_logits(ids, 0, [0])
    torch.testing.assert_close(one_shot, cpu_logits, rtol=1e-2, atol=1e-2)   # bf16 weights, fp32 math
    chunks = [ids[:2], ids[2:4], ids[4:]]
    assert all(chunks)
    for i, chunk in enumerate(chunks):
        chunked = device_logits(chunk, 2 * i, [2, 3])                         # other blocks
    torch.testing.assert_close(chunked, one_shot, rtol=1e-4, atol=1e-4)


@on_device
@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2_moe"])  # qwen2_moe: shared expert, a dense layer
def test_greedy_tokens_equal_cpu_engine(micro, arch):
    model_dir = micro(arch)
    expected = _greedy(_engine(model_dir))
    dev = _engine(model_dir, device="cuda", device_cache_bytes=CACHE_BYTES, chunk_size=2)
    dev.set_control(rho=1.0)
    assert _greedy(dev) == expected                   # prefill in chunks of 2 tokens, then decode
    assert dev.stats().cached_fraction == {"m": 1.0}


@on_device
def test_rho_changes_nothing_but_where_weights_are_read(micro):
    model_dir = micro("qwen2")  # fused q|k|v with bias
    expected = _greedy(_engine(model_dir))
    dev = _engine(model_dir, device="cuda", device_cache_bytes=CACHE_BYTES)
    for rho in (0.0, 0.5):  # 1.0: test_greedy_tokens_equal_cpu_engine
        dev.set_control(rho=rho)
        assert dev.stats().cached_fraction["m"] == pytest.approx(rho, abs=0.05)
        assert _greedy(dev) == expected, rho


@on_device
def test_a_step_moves_ids_in_and_ids_out_only(micro, monkeypatch):
    from numba import cuda

    from worker.engine import SamplingParams

    dev = _engine(micro("llama"), device="cuda", device_cache_bytes=CACHE_BYTES)
    dev.set_control(rho=0.5)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i in range(2):
        dev.add_request(f"r{i}", "m", prompt=PROMPT, params=params)
    moved = []                                           # every copy numba makes, not only the runner's
    to_device, array_type = cuda.to_device, type(cuda.device_array(1))
    to_host = array_type.copy_to_host
    monkeypatch.setattr(cuda, "to_device", lambda a, *args, **kw: moved.append(("in", a.nbytes)) or to_device(a, *args, **kw))
    monkeypatch.setattr(array_type, "copy_to_host",
                        lambda self, *args, **kw: moved.append(("out", self.nbytes)) or to_host(self, *args, **kw))

    def packed_bytes(num_tokens, num_seqs=2, max_blocks=1):  # ids, positions, slots, seq of each, rows, tables
        return 4 * (4 * num_tokens + num_seqs + num_seqs * max_blocks)

    num_prompt = len(dev.tokenize_request("m", PROMPT))
    assert len(dev.step()) == 2                          # prefill both prompts in one step
    assert moved == [("in", packed_bytes(2 * num_prompt)), ("out", 4 * 2)]
    moved.clear()
    assert len(dev.step()) == 2                          # decode: one token of each
    assert moved == [("in", packed_bytes(2)), ("out", 4 * 2)]


@on_device
def test_sampled_and_logprobs_requests_are_sampled_on_the_host_alike(micro):
    from worker.engine import SamplingParams

    model_dir = micro("llama")
    params = SamplingParams(max_tokens=2, temperature=0.8, seed=7, ignore_eos=True, logprobs=2)
    expected = _engine(model_dir).generate("m", PROMPT, params)
    dev = _engine(model_dir, device="cuda", device_cache_bytes=CACHE_BYTES)
    got = dev.generate("m", PROMPT, params)
    assert got.new_token_ids == expected.new_token_ids
    assert [p.top_token_ids for p in got.logprobs] == [p.top_token_ids for p in expected.logprobs]
    assert [p.logprob for p in got.logprobs] == pytest.approx([p.logprob for p in expected.logprobs], abs=1e-3)
    assert dev.runner.copies.bytes_to_host >= 272 * 4   # a logits row came back


@on_device
def test_an_expert_no_token_was_routed_to_reads_nothing():
    import numpy as np
    from numba import cuda

    from c2c_kernels.cuda_backend import HybridWeight

    w = torch.randn(8, 16).to(torch.bfloat16)
    hybrid = HybridWeight(w, name="expert")
    x = torch.randn(1, 16)
    active = cuda.to_device(np.array([[0.0, 2.0]], dtype=np.float32))      # [1, E] tokens per expert
    y = cuda.to_device(np.full((1, 8), 7.0, dtype=np.float32))
    hybrid.matmul_device(cuda.to_device(x.numpy()), y, gate=(active, 0))
    assert (y.copy_to_host() == 7.0).all()                                   # skipped: y untouched
    hybrid.matmul_device(cuda.to_device(x.numpy()), y, gate=(active, 1))
    torch.testing.assert_close(torch.from_numpy(y.copy_to_host()), x @ w.float().T, rtol=1e-4, atol=1e-4)


@on_device
def test_warmup_runs_every_kernel_once():
    """What a GPU worker's warmup does (compile); in the simulator warmup itself skips it."""
    from worker.device_runner import compile_kernels

    compile_kernels(block_size=16)


@on_device
def test_load_residency_copies_the_whole_model_to_the_device(micro):
    model_dir = micro("mistral")  # a 16-token sliding window, which this prompt outgrows
    prompt = " ".join([PROMPT] * 4)
    expected = _greedy(_engine(model_dir, residency="load"), prompt)
    dev = _engine(model_dir, device="cuda", residency="load")   # no tile cache: ρ is 1 anyway
    assert len(dev.tokenize_request("m", prompt)) > 16
    assert _greedy(dev, prompt) == expected
    assert dev.stats().cached_fraction == {"m": 1.0}
    assert dev.stats().private_weight_bytes > 0
    dev.set_control(rho=0.0)
    assert dev.stats().cached_fraction == {"m": 1.0}


@pytest.mark.skipif(IN_SIM, reason="the CLI runs in a process of its own")
def test_cli_generate_on_the_device_engine(tmp_path):
    from worker.synth import synth_model

    model_dir = synth_model("llama", "micro", tmp_path / "m", seed=1)
    args = ["--model", str(model_dir), "--prompt", PROMPT, "--max-tokens", "2", "--ignore-eos", "--json",
            "--device", "cuda", "--rho", "0.5"]
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run([sys.executable, "-m", "services.cli", "generate", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["token_ids"] == _greedy(_engine(model_dir))   # the CPU engine's
