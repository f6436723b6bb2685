"""`c2cserve up` and `LocalCluster`: the whole system on one machine, one process each.

Without NATS/Redis URLs (arguments or `C2C_NATS_URL`/`C2C_REDIS_URL`) it starts
`services.embedded.EmbeddedServers`. It registers the catalog in Redis, then starts the
gateway, placer, controller and N workers as `python -m services.cli <service>`
subprocesses, and returns once the gateway answers /health and every worker heartbeats.
A process that dies while starting raises C2CError with the tail of its log.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from services import keys
from services.catalog import entry_for, to_hash
from services.embedded import EmbeddedServers, free_port, stop_processes
from services.errors import C2CError

log = logging.getLogger(__name__)
DEMO_DIR = Path("~/.cache/c2cserve/demo").expanduser()
DEMO_MODELS = (("demo-llama", "llama", 1), ("demo-qwen2", "qwen2", 2), ("demo-moe", "qwen2_moe", 3))
_STOP_TIMEOUT_S = 10.0


def demo_catalog(root: Path = DEMO_DIR) -> list[Path]:
    """Two dense models and one MoE (`small` preset), synthesized once and reused."""
    from worker.synth import synth_model

    dirs = []
    for name, arch, seed in DEMO_MODELS:
        final = root / name
        if not (final / ".complete").exists():
            log.info("synthesizing demo model %s (%s, small) under %s", name, arch, root)
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            synth_model(arch, "small", tmp, seed=seed)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        dirs.append(final)
    return dirs


class LocalCluster:
    def __init__(self, model_dirs: list[Path] | None = None, num_workers: int = 1, port: int = 0,
                 residency: str = "host", pinned: dict[int, list[str]] | None = None,
                 nats_url: str | None = None, redis_url: str | None = None,
                 extra_env: dict[str, str] | None = None):
        if residency not in ("host", "load", "dedicated"):
            raise C2CError(f"--residency {residency!r}: choose host, load or dedicated")
        if num_workers < 1:
            raise C2CError("--workers must be at least 1")
        self.model_dirs = [Path(d) for d in model_dirs] if model_dirs else None
        self.num_workers = num_workers
        self.port = port
        self.residency = residency
        self.pinned = pinned or {}
        self.nats_url = nats_url or os.environ.get("C2C_NATS_URL") or ""
        self.redis_url = redis_url or os.environ.get("C2C_REDIS_URL") or ""
        self.extra_env = extra_env or {}
        self.cluster_id = uuid.uuid4().hex[:6]
        self.worker_ids = [f"local{self.cluster_id}-w{i}" for i in range(num_workers)]
        self.url = ""
        self.model_ids: list[str] = []
        self._servers: EmbeddedServers | None = None
        self._procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._logdir: Path | None = None

    # -- start ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 120) -> LocalCluster:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        if not (self.nats_url and self.redis_url):
            self._servers = EmbeddedServers().start()
            self.nats_url, self.redis_url = self._servers.nats_url, self._servers.redis_url
        model_dirs = self.model_dirs or demo_catalog()
        self._register(model_dirs)
        self._logdir = Path(tempfile.mkdtemp(prefix="c2c-cluster-"))
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(self.port)])
        # forecast-driven prewarming is c2cserve's (host mode); the baselines do without it
        self._spawn("placer", ["placer"] + ([] if self.residency == "host" else ["--prewarm-interval-s", "0"]))
        self._spawn("controller", ["controller"])
        deadline = time.monotonic() + timeout_s
        self._wait_until(self._placer_ready, deadline, "a placer")  # it must hear the workers' first telemetry
        for index, worker_id in enumerate(self.worker_ids):
            self._spawn(worker_id, self._worker_args(index, worker_id), self._worker_env(index))
        self._wait_until(self._workers_ready, deadline, "the gateway and every worker")
        log.info("cluster up at %s: %d workers, models %s", self.url, self.num_workers, ", ".join(self.model_ids))

    def _register(self, model_dirs: list[Path]) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            for model_dir in model_dirs:
                entry = entry_for(model_dir)
                client.hset(keys.model(entry.model_id), mapping=to_hash(entry))
                self.model_ids.append(entry.model_id)
        finally:
            client.close()

    def _worker_args(self, index: int, worker_id: str) -> list[str]:
        return ["worker", "--slice-index", str(index), "--num-slices", str(self.num_workers),
                "--device", "cpu", "--worker-id", worker_id, "--residency", self.residency]

    def _worker_env(self, index: int) -> dict[str, str]:
        if self.residency != "dedicated":
            return {}
        models = self.pinned.get(index)
        if models is None:  # default: model i goes to worker i mod N
            models = [m for i, m in enumerate(self.model_ids) if i % self.num_workers == index]
        return {"C2C_WORKER_MODELS": ",".join(models)}

    def env(self) -> dict[str, str]:
        """Environment for a process joining this cluster (NATS and Redis URLs)."""
        return {**os.environ, **self.extra_env, "C2C_NATS_URL": self.nats_url, "C2C_REDIS_URL": self.redis_url,
                "PYTHONUNBUFFERED": "1"}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_path = self._logdir / f"{name}.log"
        cmd = [sys.executable, "-m", "services.cli", *argv]
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(cmd, env={**self.env(), **(env or {})}, stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append((name, proc, log_path))

    def _wait_until(self, ready, deadline: float, what: str) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                if ready(client):
                    return
                time.sleep(0.05)
        finally:
            client.close()
        raise C2CError(f"{what} did not come up in time (logs in {self._logdir})")

    def _placer_ready(self, client) -> bool:
        return any(True for _ in client.scan_iter(match=keys.PLACER_PATTERN, count=100))

    def _workers_ready(self, client) -> bool:
        return self._gateway_healthy() and all(client.exists(keys.worker(w)) for w in self.worker_ids)

    def _check_alive(self) -> None:
        for name, proc, log_path in self._procs:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                raise C2CError(f"{name} exited with code {proc.returncode} while starting:\n" + "\n".join(tail))

    def _gateway_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # -- stop -----------------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM every service (gateway first), then the servers; idempotent."""
        stop_processes([proc for _name, proc, _ in self._procs], _STOP_TIMEOUT_S)
        self._procs.clear()
        if self._servers is not None:
            self._servers.stop()
            self._servers = None
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one service by name (a worker id, "gateway", ...) and wait for it to exit."""
        for proc_name, proc, _ in self._procs:
            if proc_name == name and proc.poll() is None:
                proc.send_signal(sig)
                proc.wait(timeout=_STOP_TIMEOUT_S)
                return
        raise C2CError(f"no running service named {name!r}")

    def log_tail(self, name: str, num_lines: int = 30) -> str:
        """The end of one service's log (for test failure messages)."""
        for proc_name, _proc, path in self._procs:
            if proc_name == name:
                return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
        return ""

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- `c2cserve up` ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="*", default=None, help="checkpoint folders (default: the demo catalog)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (CPU slices), default 1")
    parser.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    parser.add_argument("--residency", default="host", choices=("host", "load", "dedicated"),
                        help="weights from the host store (host), copied on cold start (load), or pinned (dedicated)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for startup")


def run(args: argparse.Namespace) -> int:
    model_dirs = [Path(m) for m in args.models] if args.models else None
    for model_dir in model_dirs or []:
        if not (model_dir / "config.json").is_file():
            raise C2CError(f"--models {model_dir}: not a checkpoint folder (no config.json)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalCluster(model_dirs, args.workers, args.port, args.residency) as cluster:
        print(f"c2cserve is up at {cluster.url}  (models: {', '.join(cluster.model_ids)}; "
              f"{args.workers} worker(s), residency={args.residency})")
        print(f"try: curl {cluster.url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{cluster.model_ids[0]}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
        print("Ctrl-C stops everything.", flush=True)
        try:
            while not stop.wait(0.5):
                cluster._check_alive()
        except KeyboardInterrupt:
            pass
        print("stopping...", flush=True)
    return 0
