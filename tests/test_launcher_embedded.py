"""Embedded servers restart on their own ports (Valkey keeping its append-only file);
stop_processes stops everything against one shared deadline."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import redis

from services.embedded import NATS, VALKEY, EmbeddedServers, stop_processes
from services.errors import C2CError
from services.supervisor import backoff_s, describe_exit


def test_valkey_restarts_on_its_port_with_its_data(tmp_path):
    with EmbeddedServers(workdir=tmp_path, persist=True) as servers:
        url, port = servers.redis_url, servers.redis_port
        client = redis.Redis.from_url(url, decode_responses=True)
        client.set("c2c:test", "kept")
        servers.kill(VALKEY)  # SIGKILL: no shutdown save, only the append-only file
        assert servers.poll(VALKEY) is not None
        servers.restart(VALKEY)
        assert (servers.redis_port, servers.redis_url) == (port, url)
        assert client.get("c2c:test") == "kept"  # the old client reconnects to the same URL
        client.close()
    assert (tmp_path / "appendonlydir").is_dir()


def test_nats_restarts_on_its_port(tmp_path):
    with EmbeddedServers(workdir=tmp_path) as servers:
        port = servers.nats_port
        with pytest.raises(C2CError):
            servers.restart(NATS)  # still running
        servers.kill(NATS)
        servers.restart(NATS)
        assert servers.nats_port == port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert sock.recv(4).startswith(b"INFO")  # a nats-server greets every client


def _stubborn(n: int) -> list[subprocess.Popen]:
    """n processes that ignore SIGTERM (each says so before it is returned)."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    return procs


def test_stop_processes_shares_one_deadline_and_names_the_killed():
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    procs = _stubborn(3) + [quick]
    started_s = time.monotonic()
    exit_s = stop_processes(procs, 1.0, ["a", "b", "c", "quick"])
    elapsed_s = time.monotonic() - started_s
    assert [exit_s[n] for n in "abc"] == [None, None, None]  # killed at the deadline
    assert exit_s["quick"] is not None and exit_s["quick"] < 1.0
    assert all(p.poll() is not None for p in procs)
    assert elapsed_s < 2.5  # one shared 1 s deadline, not one per process (that would be 3+ s)


def test_backoff_doubles_up_to_a_cap_and_exits_are_named():
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(100) == 30.0
    assert "not a crash" in describe_exit(0)
    assert "SIGKILL" in describe_exit(-9)
    assert "exit code 3" in describe_exit(3)
