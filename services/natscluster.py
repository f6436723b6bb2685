"""A NATS cluster on loopback: N `nats-server` processes with a full mesh of routes.

The multi-node topology (deploy/compose.cluster.yml, the k8s StatefulSet) in one
machine, for tests and benchmarks of fail-over: start it, wait until every member has a
route to every other (polled on each member's monitoring endpoint `/routez`), give
clients `url` (the comma-separated server list `natsutil.connect_nats` takes), then
`kill` a member with SIGKILL to see clients move to the survivors.

Members are configured by flags, or by a cluster config file such as
deploy/nats-cluster.conf (then the flags only move its ports to free loopback ones and
the file's `$C2C_NATS_*` variables name the member, its peers and the credentials), so
a test can run the very file that ships.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import ParseResult, urlparse

from services.embedded import free_port, nats_server_binary, nats_server_env, stop_processes
from services.errors import C2CError

log = logging.getLogger(__name__)
CLUSTER_NAME = "c2c"
HOST = "127.0.0.1"


@dataclass
class ClusterMember:
    """One nats-server of the cluster and its three loopback ports."""

    name: str
    client_port: int
    route_port: int
    http_port: int
    proc: subprocess.Popen | None = None

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, endpoint: str, timeout_s: float = 1.0) -> dict:
        """GET a monitoring endpoint (`routez`, `varz`, ...) as JSON."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/{endpoint}", timeout=timeout_s) as reply:
            return json.loads(reply.read())


def _userinfo(user: str, password: str) -> str:
    return f"{user}:{password}@" if user else ""


@dataclass
class NatsCluster:
    """`num_servers` nats-servers on free loopback ports, routed to each other."""

    num_servers: int = 3
    user: str = ""
    password: str = ""
    config_path: Path | None = None
    no_advertise: bool = True  # as deploy/nats-cluster.conf: clients keep the list they were given
    workdir: Path | None = None
    members: list[ClusterMember] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def urls(self) -> list[str]:
        """One client URL per member (credentials included when the cluster has them)."""
        auth = _userinfo(self.user, self.password)
        return [f"nats://{auth}{HOST}:{m.client_port}" for m in self.members]

    @property
    def url(self) -> str:
        """Every member's URL, comma-separated: what C2C_NATS_URL holds for a cluster."""
        return ",".join(self.urls)

    def start(self, timeout_s: float = 20.0) -> NatsCluster:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="c2c-nats-cluster-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.members = [ClusterMember(f"c2c-nats-{i}", free_port(), free_port(), free_port())
                        for i in range(self.num_servers)]
        try:
            for member in self.members:
                self._spawn(member)
            self.wait_for_routes(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("NATS cluster of %d at %s", self.num_servers, ", ".join(f"{HOST}:{m.client_port}" for m in self.members))
        return self

    def _route_urls(self) -> list[str]:
        auth = _userinfo(self.user, self.password)
        return [f"nats://{auth}{HOST}:{m.route_port}" for m in self.members]

    def _command(self, member: ClusterMember) -> list[str]:
        ports = ["-a", HOST, "-p", str(member.client_port), "-m", str(member.http_port)]
        if self.config_path is not None:  # the file holds names, routes and credentials
            return [nats_server_binary(), "-c", str(self.config_path), *ports,
                    "--cluster", f"nats://{HOST}:{member.route_port}"]
        auth = _userinfo(self.user, self.password)
        command = [nats_server_binary(), *ports, "--server_name", member.name,
                   "--cluster_name", CLUSTER_NAME, "--cluster", f"nats://{auth}{HOST}:{member.route_port}",
                   "--routes", ",".join(self._route_urls()), f"--no_advertise={str(self.no_advertise).lower()}"]
        if self.user:
            command += ["--user", self.user, "--pass", self.password]
        return command

    def _env(self, member: ClusterMember) -> dict[str, str]:
        """The variables a cluster config file reads (harmless for the flags-only form)."""
        routes = {f"C2C_NATS_ROUTE_{i + 1}": url for i, url in enumerate(self._route_urls())}
        return {**nats_server_env(), **routes, "C2C_NATS_SERVER_NAME": member.name,
                "C2C_NATS_USER": self.user, "C2C_NATS_PASSWORD": self.password}

    def _spawn(self, member: ClusterMember) -> None:
        with open(self.workdir / f"{member.name}.log", "ab") as log_file:
            member.proc = subprocess.Popen(
                self._command(member), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env=self._env(member),
            )

    def wait_for_routes(self, timeout_s: float = 20.0) -> None:
        """Return once every running member routes to every other running one (all of the
        route pool's connections up); raise C2CError naming the member that is not."""
        deadline = time.monotonic() + timeout_s
        pending = [m for m in self.members if m.is_running]
        while pending:
            pending = [m for m in pending if not self._is_fully_routed(m)]
            if pending and time.monotonic() > deadline:
                raise C2CError(f"NATS cluster: {pending[0].name} has no full mesh of routes after "
                               f"{timeout_s:.0f} s: {self._log_tail(pending[0])}")
            if pending:
                time.sleep(0.05)

    def _is_fully_routed(self, member: ClusterMember) -> bool:
        if not member.is_running:
            raise C2CError(f"NATS cluster: {member.name} exited with code {member.proc.returncode} "
                           f"{self._log_tail(member)}")
        peers = {m.name for m in self.members if m.is_running and m is not member}
        try:
            pool_size = int(member.monitor("varz")["cluster"].get("pool_size") or 1)
            routes = member.monitor("routez")["routes"] or []
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            return False  # not listening yet
        per_peer = Counter(r.get("remote_name") for r in routes)
        return all(per_peer[name] >= pool_size for name in peers)

    def _log_tail(self, member: ClusterMember, num_lines: int = 5) -> str:
        """The last lines of a member's log (the folder is gone once the cluster stops)."""
        try:
            lines = (self.workdir / f"{member.name}.log").read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"no log ({exc})"
        return " | ".join(lines[-num_lines:])

    def member_at(self, connected_url: str | ParseResult) -> int:
        """The index of the member a client's `nc.connected_url` (or a URL string) points at."""
        port = urlparse(connected_url).port if isinstance(connected_url, str) else connected_url.port
        for index, member in enumerate(self.members):
            if member.client_port == port:
                return index
        raise C2CError(f"{connected_url} is no member of this NATS cluster")

    def kill(self, index: int) -> None:
        """SIGKILL one member (no goodbye to clients or routes) and reap it."""
        member = self.members[index]
        if member.is_running:
            member.proc.kill()  # SIGKILL
            member.proc.wait()
            log.info("killed NATS cluster member %s", member.name)

    def stop(self) -> None:
        stop_processes([m.proc for m in self.members if m.proc is not None], timeout_s=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
