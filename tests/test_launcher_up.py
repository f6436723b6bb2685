"""`c2cserve up` itself, as a user runs it: progress while starting, a banner that names
`$C2C_API_KEY` (never the key), a served request, and a stop that survives a second
SIGTERM (a service manager's, `timeout`'s) without orphaning a single service.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from services.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
CEILING_S = 600.0
KEY = "test-key-not-to-be-printed"


def _read_until(proc: subprocess.Popen, marker: str, lines: list[str]) -> None:
    deadline = time.monotonic() + CEILING_S
    for line in proc.stdout:
        lines.append(line.rstrip())
        if marker in line:
            return
        assert time.monotonic() < deadline, lines
    raise AssertionError(f"up ended before {marker!r}:\n" + "\n".join(lines))


def _complete(url: str, model_id: str) -> dict:
    body = json.dumps({"model": model_id, "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", body, headers), timeout=60) as resp:
        return json.loads(resp.read())


def test_up_serves_with_a_key_and_stops_cleanly_on_two_sigterms(tiny_model):
    model_dir, port = tiny_model("llama"), free_port()
    env = {**os.environ, "C2C_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "services.cli", "up", "--models", str(model_dir), "--port", str(port),
           "--timeout", str(CEILING_S)]
    up = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    children: list[psutil.Process] = []
    try:
        _read_until(up, "Ctrl-C stops everything.", lines)
        children = psutil.Process(up.pid).children(recursive=True)
        assert lines[0].startswith("starting; logs in ")
        curl = next(ln for ln in lines if ln.startswith("try: curl "))
        assert '-H "Authorization: Bearer $C2C_API_KEY"' in curl and KEY not in "\n".join(lines)
        assert _complete(f"http://127.0.0.1:{port}", model_dir.name)["usage"]["completion_tokens"] == 4
        up.send_signal(signal.SIGTERM)
        _read_until(up, "stopping...", lines)
        up.send_signal(signal.SIGTERM)  # a second one must not abort the stop
        assert up.wait(timeout=60) == 0
        lines += [ln.rstrip() for ln in up.stdout]
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [c.cmdline() for c in alive]
    finally:  # nothing of this test outlives it
        if up.poll() is None:
            up.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    assert lines[-1].startswith("stopped in "), lines
