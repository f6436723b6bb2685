"""First start on a busy machine: the kernel compile step (`python -m kernels.precompile`,
what `c2cserve up` runs before any worker) with an EMPTY Numba cache while a busy loop
holds a core. It must finish, say up front that it compiles and roughly how long it
takes, report progress every few seconds, and leave a cache the next run only loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _precompile(cache_dir: Path, timeout_s: float) -> tuple[list[str], float]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}  # numba honours it for cache=True
    started_s = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kernels.precompile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.splitlines(), time.monotonic() - started_s


@pytest.fixture
def busy_core():
    """A process spinning on one core for the whole test."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cold_compile_reports_progress_and_fills_the_cache(tmp_path, busy_core):
    cache_dir = tmp_path / "numba-cache"
    cache_dir.mkdir()
    lines, cold_s = _precompile(cache_dir, timeout_s=1200)
    print(f"cold compile with a busy core: {cold_s:.0f} s; output:\n" + "\n".join(lines))
    assert lines[0].startswith("compiling CPU kernels (first run only, ~") and lines[0].endswith(" s)…")
    ticks = [ln for ln in lines if ln.startswith("  compiling CPU kernels: ")]
    assert ticks, lines  # a cold compile takes far longer than one 5 s tick
    assert "kernel variants done" in ticks[-1]
    assert lines[-1].startswith("CPU kernels compiled in ")
    assert list(cache_dir.rglob("*.nbi")) and list(cache_dir.rglob("*.nbc"))  # the cache went where told
    warm_lines, warm_s = _precompile(cache_dir, timeout_s=300)
    print(f"warm run: {warm_s:.1f} s: {warm_lines}")
    assert len(warm_lines) == 1 and warm_lines[0].startswith("CPU kernels loaded from the cache in ")
