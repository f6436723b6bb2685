"""The local cluster's processes: start them (`ServiceProcess`, `start_reporting`), stop
them all at once against one deadline (`stop_all`), and restart what exits: the
supervision loop behind `c2cserve up` (LocalCluster(supervise=True)).

A `Unit` is anything with a name, a way to see it has exited and a way to start it again:
a service subprocess (gateway, placer, controller, a worker) or an embedded server
(nats-server, valkey-server, restarted on the same port). A thread polls every unit;
one that has exited is started again after an exponential backoff (0.5 s, 1 s, 2 s, …
up to 30 s), reset once it has run for `STABLE_S`. Every exit is logged with its code.

An exit with code 0 is a graceful stop (someone sent the process SIGTERM), not a crash:
it is logged as such and the process is started again all the same, after the same
backoff, because `up` keeps the cluster at the size it was asked for; only Ctrl-C or
SIGTERM to `up` itself ends the cluster. `on_restarted(name)` runs after each restart
and `on_tick()` every `tick_s` (the launcher re-registers the catalog there).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.embedded import stop_processes
from services.errors import C2CError

log = logging.getLogger(__name__)
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a unit that ran this long starts its backoff afresh


@dataclass
class Unit:
    name: str
    poll: Callable[[], int | None]  # the exit code once it has exited, else None
    restart: Callable[[], None]  # start it again; raises C2CError or OSError on failure


@dataclass
class ServiceProcess:
    """One `python -m services.cli <argv>` child, its output appended to `log_path`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        cmd = [sys.executable, "-m", "services.cli", *self.argv]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def restart(self) -> None:
        with open(self.log_path, "a") as log_file:
            log_file.write(f"--- c2cserve: restarting {self.name} at {time.strftime('%H:%M:%S')} ---\n")
        self.start()

    def poll(self) -> int | None:
        return self.proc.poll()

    def unit(self) -> Unit:
        return Unit(self.name, self.poll, self.restart)


def start_reporting(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path,
                    report: Callable[[str], None]) -> subprocess.Popen:
    """A child whose output lines go to `report` (its stdout) and to `log_path` (both)."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log_file,
                                stdin=subprocess.DEVNULL, encoding="utf-8", errors="replace",
                                start_new_session=True)
    threading.Thread(target=_pump, args=(proc, log_path, report), daemon=True).start()
    return proc


def _pump(proc: subprocess.Popen, log_path: Path, report: Callable[[str], None]) -> None:
    with open(log_path, "a", encoding="utf-8") as log_file:
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            report(line.rstrip())


def stop_all(services: list[ServiceProcess], timeout_s: float) -> dict[str, float | None]:
    """SIGTERM every service at once, one shared deadline, SIGKILL after it; logs the
    slowest and the killed. Returns name -> seconds to exit (None: killed)."""
    started_s = time.monotonic()
    exit_s = stop_processes([s.proc for s in services], timeout_s, [s.name for s in services])
    if not exit_s:
        return exit_s
    killed = [n for n, s in exit_s.items() if s is None]
    if killed:
        log.warning("%s did not stop within %.0f s of SIGTERM: killed", ", ".join(killed), timeout_s)
    slowest = max(exit_s, key=lambda n: timeout_s if exit_s[n] is None else exit_s[n])
    log.info("services stopped in %.1f s (slowest: %s)", time.monotonic() - started_s, slowest)
    return exit_s


@dataclass
class _UnitState:
    started_s: float
    num_failures: int = 0  # exits since it last ran STABLE_S
    due_s: float | None = None  # when it restarts; None while it runs
    num_restarts: int = 0


def backoff_s(num_failures: int) -> float:
    """Delay before the restart that follows `num_failures` quick exits in a row (>= 1)."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, num_failures - 1))


def describe_exit(code: int) -> str:
    if code == 0:
        return "stopped gracefully (exit 0, not a crash)"
    if code < 0:
        try:
            return f"crashed (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"crashed (killed by signal {-code})"
    return f"crashed (exit code {code})"


class Supervisor:
    def __init__(self, units: list[Unit], on_restarted: Callable[[str], None] | None = None,
                 on_tick: Callable[[], None] | None = None, poll_s: float = 0.2, tick_s: float = 2.0):
        self.units = units
        self.on_restarted = on_restarted or (lambda name: None)
        self.on_tick = on_tick or (lambda: None)
        self.poll_s = poll_s
        self.tick_s = tick_s
        now = time.monotonic()
        self._states = {u.name: _UnitState(started_s=now) for u in units}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="c2c-supervisor", daemon=True)
        self._last_tick_s = now

    def start(self) -> Supervisor:
        self._thread.start()
        log.info("supervising %s", ", ".join(u.name for u in self.units))
        return self

    def stop(self) -> None:
        """Stop restarting (before the cluster is taken down); idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def num_restarts(self, name: str) -> int:
        return self._states[name].num_restarts

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            for unit in self.units:
                if self._stop.is_set():
                    return
                self._check(unit, self._states[unit.name])
            if time.monotonic() - self._last_tick_s >= self.tick_s:
                self._last_tick_s = time.monotonic()
                self._guarded(self.on_tick, "periodic check")

    def _check(self, unit: Unit, state: _UnitState) -> None:
        now = time.monotonic()
        if state.due_s is None:
            code = unit.poll()
            if code is None:
                return
            state.num_failures = 1 if now - state.started_s >= STABLE_S else state.num_failures + 1
            state.due_s = now + backoff_s(state.num_failures)
            level = logging.INFO if code == 0 else logging.WARNING
            log.log(level, "%s %s after %.0f s; restarting in %.1f s", unit.name, describe_exit(code),
                    now - state.started_s, state.due_s - now)
        elif now >= state.due_s:
            self._restart(unit, state)

    def _restart(self, unit: Unit, state: _UnitState) -> None:
        try:
            unit.restart()
        except (C2CError, OSError) as exc:
            state.num_failures += 1
            state.due_s = time.monotonic() + backoff_s(state.num_failures)
            log.warning("restarting %s failed (%s); next try in %.1f s", unit.name, exc,
                        state.due_s - time.monotonic())
            return
        state.due_s, state.started_s = None, time.monotonic()
        state.num_restarts += 1
        log.info("%s restarted (restart #%d)", unit.name, state.num_restarts)
        self._guarded(lambda: self.on_restarted(unit.name), f"after restarting {unit.name}")

    def _guarded(self, fn: Callable[[], None], what: str) -> None:
        """A failing callback is logged; the loop must outlive it."""
        try:
            fn()
        except Exception:  # the supervisor is the last line of defence: log and go on
            log.exception("supervisor: %s failed", what)
