"""First start on a busy machine, as `c2cserve up` does it: a supervised LocalCluster with
the kernel compile step (`python -m c2c_kernels.precompile`) and an EMPTY Numba cache
(`NUMBA_CACHE_DIR`, which Numba honours for `cache=True` functions) while a busy loop
holds a core. The compile must say up front that it compiles and about how long it takes,
report progress every few seconds, finish before any worker starts (the worker then only
loads the code: it writes nothing to the cache), and the cluster must serve. A second
compile run finds everything cached. Times are printed, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.launcher import PRECOMPILE, LocalCluster

ROOT = Path(__file__).resolve().parents[1]
CEILING_S = 900.0


@pytest.fixture
def busy_core():
    """A process spinning on one core for the whole test."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


def _complete(url: str, model_id: str) -> dict:
    body = json.dumps({"model": model_id, "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def _check_compile_lines(lines: list[str]) -> None:
    compile_lines = [ln for ln in lines if "CPU kernels" in ln]
    assert compile_lines[0].startswith("compiling CPU kernels (first run only, ~"), lines
    assert compile_lines[0].endswith(" s)...")
    ticks = [ln for ln in compile_lines if ln.startswith("  compiling CPU kernels: ")]
    assert ticks and "kernel variants done" in ticks[-1], lines  # a cold compile outlasts a 5 s tick
    assert compile_lines[-1].startswith("CPU kernels compiled in ")


@pytest.mark.slow
@pytest.mark.timeout(int(CEILING_S) + 300)
def test_first_start_compiles_once_with_progress_then_serves(tmp_path, tiny_model, busy_core):
    cache_dir = tmp_path / "numba-cache"
    cache_dir.mkdir()
    model_dir = tiny_model("llama", dtype="bfloat16")  # bf16 weights run the Numba kernels
    lines: list[str] = []
    started_s = time.monotonic()
    with LocalCluster([model_dir], supervise=True, precompile=True, progress=lines.append,
                      extra_env={"NUMBA_CACHE_DIR": str(cache_dir)}).start(timeout_s=CEILING_S) as cluster:
        up_s = time.monotonic() - started_s
        assert _complete(cluster.url, model_dir.name)["choices"][0]["finish_reason"] in ("length", "stop")
        compiled_at_s = (cluster.workdir / f"{PRECOMPILE}.log").stat().st_mtime
        late = [p.name for p in cache_dir.rglob("*.nb*") if p.stat().st_mtime > compiled_at_s]
    print(f"first start with an empty cache and a busy core: serving after {up_s:.0f} s\n" + "\n".join(lines))
    _check_compile_lines(lines)
    assert list(cache_dir.rglob("*.nbi")), "nothing went to NUMBA_CACHE_DIR"
    assert not late, f"the worker compiled what the compile step had not: {late}"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    warm = subprocess.run([sys.executable, "-m", "c2c_kernels.precompile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert warm.stdout.startswith("CPU kernels loaded from the cache in "), warm.stdout
