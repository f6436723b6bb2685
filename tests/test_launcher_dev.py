"""`./dev`: usage without a command (exit 2, nothing installed), stamps per install level."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["install", "bogus"]])
def test_dev_prints_usage_and_exits_2(argv, tmp_path):
    venv = tmp_path / "venv"  # must stay untouched: usage comes before any install
    done = subprocess.run([str(ROOT / "dev"), *argv], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "C2C_VENV": str(venv)})
    assert done.returncode == 2
    assert done.stderr.startswith("usage: ./dev")
    assert "./dev up" in done.stderr and "./dev test" in done.stderr
    assert not venv.exists()


def _fake_venv(venv: Path, calls: Path) -> None:
    """A venv whose python and c2cserve only record how they were called."""
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "c2cserve"):
        path = venv / "bin" / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        path.chmod(0o755)


def test_dev_installs_test_extras_only_for_test_and_never_twice(tmp_path):
    venv, calls = tmp_path / "venv", tmp_path / "calls.txt"
    _fake_venv(venv, calls)

    def dev(*argv: str) -> list[str]:
        calls.write_text("")
        subprocess.run([str(ROOT / "dev"), *argv], check=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "C2C_VENV": str(venv)}, capture_output=True)
        return calls.read_text().splitlines()

    assert dev("c2cserve", "--help")[-2:] == ["python -m pip install -q -e .", "c2cserve --help"]
    assert dev("up", "--port", "1") == ["c2cserve up --port 1"]  # the project is installed: no pip
    assert dev("test", "-x")[-2:] == ["python -m pip install -q -e .[test]", "python -m pytest -q -x"]
    assert dev("up") == ["c2cserve up"]  # the test extras include the project
    assert dev("test") == ["python -m pytest -q"]


def test_ci_runs_ruff_then_exactly_dev_test():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[-1] == "./dev test"
    assert "ruff" in lines[-2] and "check" in lines[-2]
