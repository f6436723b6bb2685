"""Shared fixtures: real NATS + Redis servers, a private host store, tiny checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

# Before torch is imported anywhere (see services/cli.py): passive OpenMP waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests compare with float references: exact prefill maths even on an AMX CPU (where the
# default is bf16 activations); the bf16 path has its own tests that opt in.
os.environ.setdefault("C2C_PREFILL_MATH", "exact")

from services.embedded import EmbeddedServers

_SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


@pytest.fixture(scope="session")
def servers():
    """A real nats-server and valkey-server on free loopback ports."""
    with EmbeddedServers() as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def private_autotune_file(tmp_path_factory):
    """Prefill autotune decisions of this session only (the user's cache file stays clean);
    service subprocesses inherit the variable."""
    previous = os.environ.get("C2C_AUTOTUNE_FILE")
    os.environ["C2C_AUTOTUNE_FILE"] = str(tmp_path_factory.mktemp("autotune") / "prefill_autotune.json")
    yield
    if previous is None:
        os.environ.pop("C2C_AUTOTUNE_FILE", None)
    else:
        os.environ["C2C_AUTOTUNE_FILE"] = previous


@pytest.fixture(scope="session", autouse=True)
def host_store_root(tmp_path_factory):
    """A host store of this test session only, in shared memory when the machine has it."""
    if _SHM is not None:
        root = _SHM / f"c2c-test-{uuid.uuid4().hex[:8]}"
        root.mkdir()
    else:
        root = tmp_path_factory.mktemp("hoststore")
    previous = os.environ.get("C2C_HOST_STORE")
    os.environ["C2C_HOST_STORE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("C2C_HOST_STORE", None)
    else:
        os.environ["C2C_HOST_STORE"] = previous
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def run_in_cuda_simulator():
    """run(test_file): the file's tests in a fresh pytest with NUMBA_ENABLE_CUDASIM=1.

    Numba picks the simulator when it is first imported, so simulator tests run in their
    own process; they skip themselves in the normal run. Returns pytest's last line.
    """

    def run(test_file: str, timeout_s: float = 900) -> str:
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        return done.stdout.splitlines()[-1]

    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(arch, seed=0, dtype=None) -> checkpoint folder (cached)."""
    from worker.synth import synth_model

    made: dict[tuple, Path] = {}

    def make(arch: str, seed: int = 0, dtype: str | None = None) -> Path:
        key = (arch, seed, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-{seed}-{dtype or 'default'}")
            made[key] = synth_model(arch, "tiny", out, seed=seed, dtype=dtype)
        return made[key]

    return make


@pytest.fixture(scope="session")
def greedy_texts():
    """Factory: greedy_texts(model_dir, prompts, max_tokens, ignore_eos=True) -> {prompt: text},
    the engine's own greedy answers (what a cluster must return exactly)."""
    from worker.engine import Engine, SamplingParams

    def make(model_dir: Path, prompts: list[str], max_tokens: int, ignore_eos: bool = True) -> dict[str, str]:
        engine = Engine()
        engine.add_model(model_dir.name, model_dir)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        return {p: engine.generate(model_dir.name, p, params).new_text for p in prompts}

    return make
