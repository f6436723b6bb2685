"""`c2cserve up` and `LocalCluster`: the whole system on one machine, one process each.

Without NATS/Redis URLs (arguments or `C2C_NATS_URL`/`C2C_REDIS_URL`) it starts
`services.embedded.EmbeddedServers` (Valkey with an append-only file in the cluster's
work dir). It registers the catalog in Redis, then starts the gateway, placer,
controller and N workers as `python -m services.cli <service>` subprocesses, and returns
once the gateway answers /health and every worker heartbeats. With `precompile=True`
the CPU kernels are compiled into Numba's cache (`python -m c2c_kernels.precompile`) while
the other services start, before any worker does. Every few seconds of start-up it
reports what is up and what it waits on. A process that dies while starting, or a
start that outlasts `timeout_s`, raises C2CError with the tail of the culprit's log,
and the work dir (logs) is kept and named.

With `supervise=True` (what `up` runs) a `services.supervisor.Supervisor` restarts any
service or embedded server that exits, and re-registers the catalog after a Valkey
restart or when its keys vanish. `stop()` SIGTERMs every service at once and waits
against one shared deadline, then stops the servers.
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
from collections.abc import Callable
from functools import partial
from pathlib import Path

from services import keys
from services.catalog import entry_for, to_hash
from services.embedded import SERVER_NAMES, VALKEY, EmbeddedServers, free_port, stop_processes
from services.errors import C2CError
from services.supervisor import ServiceProcess, Supervisor, Unit, start_reporting, stop_all

log = logging.getLogger(__name__)
DEMO_DIR = Path("~/.cache/c2cserve/demo").expanduser()
DEMO_MODELS = (("demo-llama", "llama", 1), ("demo-qwen2", "qwen2", 2), ("demo-moe", "qwen2_moe", 3))
PROJECT_ROOT = Path(__file__).resolve().parents[1]
_STOP_TIMEOUT_S = 10.0
STATUS_EVERY_S = 5.0
PRECOMPILE = "kernel-precompile"


def demo_catalog(root: Path = DEMO_DIR) -> list[Path]:
    """Two dense models and one MoE (`small` preset), synthesized once and reused (by
    `c2cserve models synth` in a child process: the launcher imports no worker code)."""
    dirs = []
    for name, arch, seed in DEMO_MODELS:
        final = root / name
        if not (final / ".complete").exists():
            log.info("synthesizing demo model %s (%s, small) under %s", name, arch, root)
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            done = subprocess.run([sys.executable, "-m", "services.cli", "models", "synth", "--arch", arch,
                                   "--preset", "small", "--out", str(tmp), "--seed", str(seed)],
                                  cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
            if done.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise C2CError(f"synthesizing the demo model {name} under {root} failed "
                               f"(exit {done.returncode}; its error is above)")
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        dirs.append(final)
    return dirs


class LocalCluster:
    def __init__(self, model_dirs: list[Path] | None = None, num_workers: int = 1, port: int = 0,
                 residency: str = "host", pinned: dict[int, list[str]] | None = None,
                 nats_url: str | None = None, redis_url: str | None = None,
                 extra_env: dict[str, str] | None = None, supervise: bool = False,
                 precompile: bool = False, progress: Callable[[str], None] | None = None,
                 tenants_file: str | Path | None = None):
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
        self.supervise, self.precompile = supervise, precompile
        self.progress = progress or log.info
        self.tenants_file = str(Path(tenants_file).expanduser().resolve()) if tenants_file else ""
        self.cluster_id = uuid.uuid4().hex[:6]
        self.worker_ids = [f"local{self.cluster_id}-w{i}" for i in range(num_workers)]
        self.url = ""
        self.model_ids: list[str] = []
        self.workdir: Path | None = None  # logs, Valkey's append-only file
        self.stop_times_s: dict[str, float | None] = {}  # the last stop: service -> s (None: killed)
        self._servers: EmbeddedServers | None = None
        self._services: dict[str, ServiceProcess] = {}
        self._lock = threading.RLock()
        self._supervisor: Supervisor | None = None
        self._precompiler: subprocess.Popen | None = None
        self._catalog_dirs: list[Path] = []
        self._keep_workdir = False
        self._started_s = 0.0

    # -- start ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 120) -> LocalCluster:
        if self.workdir is not None:
            raise C2CError("this cluster is already started")
        try:
            self._start(timeout_s)
        except Exception:
            self._keep_workdir = True  # the error names it
            self.stop()
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        self._started_s = time.monotonic()
        deadline = self._started_s + timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="c2c-cluster-"))
        self.progress(f"starting; logs in {self.workdir}")
        if self.precompile:
            self._start_precompile()
        if not (self.nats_url and self.redis_url):
            self._servers = EmbeddedServers(workdir=self.workdir, persist=True).start()
            self.nats_url, self.redis_url = self._servers.nats_url, self._servers.redis_url
        self._catalog_dirs = self.model_dirs or demo_catalog()
        self.model_ids = self._register_catalog()
        self._start_services()
        self._wait_until(self._placer_ready, deadline, "the placer")  # it must hear the workers' first telemetry
        if self._precompiler is not None:
            self._wait_until(self._precompiled, deadline, "the kernel compile")
        for index, worker_id in enumerate(self.worker_ids):
            self._spawn(worker_id, self._worker_args(index, worker_id), self._worker_env(index))
        self._wait_until(self._workers_ready, deadline, "the gateway and every worker")
        if self.supervise:
            self._supervisor = Supervisor(self._units(), self._on_restarted, self._ensure_catalog).start()
        log.info("cluster up at %s in %.0f s: %d workers, models %s", self.url, time.monotonic() - self._started_s,
                 self.num_workers, ", ".join(self.model_ids))

    def _start_services(self) -> None:
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tenants = ["--tenants", self.tenants_file] if self.tenants_file else []
        self._spawn("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(self.port), *tenants])
        # forecast-driven prewarming is c2cserve's (host mode); the baselines do without it
        self._spawn("placer", ["placer"] + ([] if self.residency == "host" else ["--prewarm-interval-s", "0"]))
        self._spawn("controller", ["controller"])

    def _start_precompile(self) -> None:
        """`python -m c2c_kernels.precompile` in the background, its lines reported as they
        come. Run from the project root so `-m c2c_kernels` finds ours."""
        self._precompiler = start_reporting([sys.executable, "-m", "c2c_kernels.precompile"], PROJECT_ROOT, self.env(),
                                            self.workdir / f"{PRECOMPILE}.log", self.progress)

    def _register_catalog(self) -> list[str]:
        """Write the catalog (the model folders are its source of truth); returns the ids."""
        client = self._redis()
        try:
            entries = [entry_for(d) for d in self._catalog_dirs]
            for entry in entries:
                client.hset(keys.model(entry.model_id), mapping=to_hash(entry))
            return [e.model_id for e in entries]
        finally:
            client.close()

    def _redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5,
                                    socket_connect_timeout=2)

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
        service = ServiceProcess(name, argv, {**self.env(), **(env or {})}, self.workdir / f"{name}.log")
        with self._lock:
            self._services[name] = service.start()

    # -- waiting and reporting while starting --------------------------------------------
    def _wait_until(self, ready: Callable, deadline: float, what: str) -> None:
        client = self._redis()
        try:
            next_status_s = time.monotonic() + STATUS_EVERY_S
            while time.monotonic() < deadline:
                self._check_alive()
                if ready(client):
                    return
                if time.monotonic() >= next_status_s:
                    self._report_status(client)
                    next_status_s += STATUS_EVERY_S
                time.sleep(0.05)
            raise self._timeout_error(what, client)
        finally:
            client.close()

    def _placer_ready(self, client) -> bool:
        return any(True for _ in client.scan_iter(match=keys.PLACER_PATTERN, count=100))

    def _precompiled(self, _client) -> bool:
        code = self._precompiler.poll()
        if code not in (None, 0):
            raise C2CError(f"the kernel compile (python -m c2c_kernels.precompile) exited with code {code}:\n"
                           f"{self.log_tail(PRECOMPILE, 15)}\n(logs kept in {self.workdir})")
        return code == 0

    def _workers_ready(self, client) -> bool:
        return self._gateway_healthy() and all(client.exists(keys.worker(w)) for w in self.worker_ids)

    def _is_ready(self, name: str, client) -> bool:
        if name == "gateway":  # it answers (503 until a worker lives)
            return self._gateway_health() is not None
        if name == "placer":
            return self._placer_ready(client)
        if name == "controller":  # it has no readiness signal: running is up
            return self._services[name].proc.poll() is None
        return bool(client.exists(keys.worker(name)))

    def _status(self, client) -> tuple[list[str], list[str]]:
        """(what is up, what start-up waits on) right now."""
        up = list(SERVER_NAMES) if self._servers is not None else []
        waiting = []
        for name in list(self._services):
            (up if self._is_ready(name, client) else waiting).append(name)
        if self._precompiler is not None and self._precompiler.poll() is None:
            waiting.append("CPU kernel compile")
        return up, waiting

    def _report_status(self, client) -> None:
        up, waiting = self._status(client)
        if waiting == ["CPU kernel compile"]:
            return  # its own progress lines say it
        self.progress(f"starting ({time.monotonic() - self._started_s:.0f} s): up: {', '.join(up) or 'nothing yet'}; "
                      f"waiting on: {', '.join(waiting) or 'the gateway to see the workers'}")

    def _timeout_error(self, what: str, client) -> C2CError:
        _up, waiting = self._status(client)
        fallback = PRECOMPILE if "CPU kernel compile" in waiting else "gateway"
        culprit = next((n for n in waiting if n in self._services), fallback)
        return C2CError(f"start-up timed out after {time.monotonic() - self._started_s:.0f} s waiting for {what} "
                        f"(raise --timeout on a slow machine); waiting on: {', '.join(waiting) or what}.\n"
                        f"last lines of {culprit}.log:\n{self.log_tail(culprit, 15)}\n(logs kept in {self.workdir})")

    def _check_alive(self) -> None:
        for name, service in list(self._services.items()):
            if service.proc.poll() is not None:
                raise C2CError(f"{name} exited with code {service.proc.returncode} while starting; "
                               f"last lines of {service.log_path.name}:\n{self.log_tail(name, 15)}\n"
                               f"(logs kept in {self.workdir})")

    def _gateway_healthy(self) -> bool:
        return self._gateway_health() == 200

    def _gateway_health(self) -> int | None:
        """/health's status (503 until a worker lives), None while nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    # -- supervision ------------------------------------------------------------------------
    def _units(self) -> list[Unit]:
        units = [Unit(n, partial(self._servers.poll, n), partial(self._servers.restart, n))
                 for n in (SERVER_NAMES if self._servers is not None else ())]
        return units + [s.unit() for s in self._services.values()]

    def _on_restarted(self, name: str) -> None:
        if name == VALKEY:  # its append-only file has the catalog; the folders have the truth
            self._register_catalog()
            log.info("catalog re-registered after the Valkey restart: %s", ", ".join(self.model_ids))

    def _ensure_catalog(self) -> None:
        """Re-register the catalog when any of its keys has vanished (a flush, a lost file)."""
        import redis

        client = self._redis()
        try:
            if client.exists(*(keys.model(m) for m in self.model_ids)) < len(self.model_ids):
                self._register_catalog()
                log.warning("catalog keys were missing in Redis; re-registered %s", ", ".join(self.model_ids))
        except (redis.RedisError, OSError) as exc:  # Valkey restarting: the next tick retries
            log.debug("catalog check skipped: %s", exc)
        finally:
            client.close()

    # -- stop -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop supervising, SIGTERM every service at once (one shared deadline, SIGKILL
        after it), then the servers; logs how long each took; idempotent."""
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None
        if self._precompiler is not None:
            stop_processes([self._precompiler], 5.0)
            self._precompiler = None
        self._stop_services()
        if self._servers is not None:
            self._servers.stop()
            self._servers = None
        if self.workdir is not None:
            if self._keep_workdir:
                log.warning("logs kept in %s", self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _stop_services(self) -> None:
        with self._lock:
            services = [s for s in self._services.values() if s.proc is not None]
            self._services.clear()
        if services:
            self.stop_times_s = stop_all(services, _STOP_TIMEOUT_S)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one service by name (a worker id, "gateway", ..., or "nats-server" /
        "valkey-server") and wait for it to exit. Supervised, it is then restarted."""
        if name in SERVER_NAMES and self._servers is not None:
            self._servers.kill(name, sig)
            return
        with self._lock:
            service = self._services.get(name)
            proc = service.proc if service is not None else None
        if proc is None or proc.poll() is not None:
            raise C2CError(f"no running service named {name!r}")
        proc.send_signal(sig)
        proc.wait(timeout=_STOP_TIMEOUT_S)

    def pid(self, name: str) -> int:
        """The pid of a service's or embedded server's current process."""
        if name in SERVER_NAMES and self._servers is not None:
            return self._servers.process(name).pid
        return self._services[name].proc.pid

    def log_tail(self, name: str, num_lines: int = 30) -> str:
        """The end of one service's log (for test failure messages)."""
        if self.workdir is None:
            return ""
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])

    def __enter__(self) -> LocalCluster:
        return self if self.workdir is not None else self.start()  # `with cluster.start(timeout_s=…):` too

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- `c2cserve up` ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="*", default=None, help="checkpoint folders (default: the demo catalog)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (CPU slices), default 1")
    parser.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    parser.add_argument("--residency", default="host", choices=("host", "load", "dedicated"),
                        help="weights from the host store (host), copied on cold start (load), or pinned (dedicated)")
    parser.add_argument("--tenants", default=None, metavar="FILE",
                        help="tenants file (API keys, private models, limits; JSON or YAML): docs/tenants.md")
    parser.add_argument("--quantize", choices=("int8", "q4"), default=None,
                        help="workers quantize the projection matrices into the host store: int8 per channel or "
                             "q4 (4-bit groups of 32); sets C2C_QUANTIZE for them")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds to wait for startup, first-run kernel compile included (default 300)")


def banner(url: str, model_ids: list[str], num_workers: int, residency: str, has_api_key: bool,
           tenants_file: str = "") -> list[str]:
    """What `up` prints once the cluster serves; the key itself is never printed."""
    auth = ' -H "Authorization: Bearer $C2C_API_KEY"' if has_api_key else ""
    if tenants_file:
        auth = ' -H "Authorization: Bearer $TENANT_KEY"'
        tenants_line = [f"tenants from {tenants_file} (edit it to reload; docs/tenants.md)"]
    else:
        tenants_line = []
    return [f"c2cserve is up at {url}  (models: {', '.join(model_ids)}; {num_workers} worker(s), "
            f"residency={residency}; crashed services are restarted)",
            f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{{\"model\": \"{model_ids[0]}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
            *tenants_line, "Ctrl-C stops everything."]


def _say(line: str) -> None:
    print(line, flush=True)


def gguf_folder(path: Path) -> Path:
    """The checkpoint folder a .gguf file converts into (once; `c2cserve models gguf` in a
    child process, as for the demo catalog: the launcher imports no worker code)."""
    _say(f"reading {path} (a GGUF file converts into a checkpoint folder once)...")
    done = subprocess.run([sys.executable, "-m", "services.cli", "models", "gguf", str(path)], cwd=PROJECT_ROOT,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise C2CError(f"--models {path}: cannot serve this GGUF file (exit {done.returncode}; its error is above)")
    return Path(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    model_dirs = [gguf_folder(Path(m)) if m.endswith(".gguf") else Path(m) for m in args.models or []] or None
    for model_dir in model_dirs or []:
        if not (model_dir / "config.json").is_file():
            raise C2CError(f"--models {model_dir}: not a checkpoint folder (no config.json)")
    if args.tenants:
        from services.tenants import load_file

        load_file(args.tenants)  # a bad file is refused before anything starts
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    cluster = LocalCluster(model_dirs, args.workers, args.port, args.residency, supervise=True,
                           precompile=True, progress=_say, tenants_file=args.tenants,
                           extra_env={"C2C_QUANTIZE": args.quantize} if args.quantize else None)
    try:
        cluster.start(timeout_s=args.timeout)
        for line in banner(cluster.url, cluster.model_ids, args.workers, args.residency,
                           bool(os.environ.get("C2C_API_KEY")), cluster.tenants_file):
            _say(line)
        threading.Event().wait()  # the supervisor thread works; Ctrl-C or SIGTERM ends this
    except KeyboardInterrupt:
        _stop(cluster)
    return 0


def _stop(cluster: LocalCluster) -> None:
    """Stop once, whatever else arrives: a second Ctrl-C or SIGTERM (`timeout`, a service
    manager) would otherwise abort the stop half-way and orphan services. It is bounded."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _say("stopping...")
    started_s = time.monotonic()
    cluster.stop()
    slowest = max(cluster.stop_times_s.items(), key=lambda kv: _STOP_TIMEOUT_S if kv[1] is None else kv[1], default=None)
    took = "" if slowest is None else f" (slowest: {slowest[0]}, " + (
        "killed)" if slowest[1] is None else f"{slowest[1]:.1f} s)")
    _say(f"stopped in {time.monotonic() - started_s:.1f} s{took}")
