"""docker-compose.yml, deploy/compose.cluster.yml and deploy/k8s: every service runs a real
`c2cserve` command, and the files are secure by default: credentials required (compose
refuses to start without them), only the gateway published and on loopback, restart
policies and probes everywhere, persistent Redis, catalog confined to /models.

No Docker engine or cluster here: the files are loaded as YAML (anchors resolved, compose
`${VAR}` interpolation done here) and checked; the NATS configs run in a real nats-server.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from services.cli import COMMANDS, build_parser
from services.config import GatewayConfig, PlacerConfig, WorkerConfig, load_config
from services.embedded import nats_server_binary

ROOT = Path(__file__).resolve().parents[1]
CLIENT_SERVICES = ("gateway", "placer", "controller", "worker-gpu", "worker-cpu")
_COMPOSE_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` substitution."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name, "")
        if op and op.endswith("?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value or (arg if op and op.endswith("-") else "")

    return _COMPOSE_VAR.sub(substitute, text)


@pytest.fixture(scope="module")
def credentials() -> dict[str, str]:
    """What `deploy/gen-credentials.sh > .env` writes, as a dict."""
    out = subprocess.run(["sh", str(ROOT / "deploy/gen-credentials.sh")], capture_output=True, text=True, check=True)
    pairs = [line.split("=", 1) for line in out.stdout.splitlines() if line and not line.startswith("#")]
    return dict(pairs)


def _load_compose(relative: str, env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate((ROOT / relative).read_text(), env))


@pytest.fixture(scope="module")
def compose(credentials) -> dict:
    return _load_compose("docker-compose.yml", credentials)


@pytest.fixture(scope="module")
def cluster_compose(credentials) -> dict:
    return _load_compose("deploy/compose.cluster.yml", credentials)


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/c2cserve.yaml").read_text()) if d]


def _command_path(command: list[str]) -> tuple[str, ...]:
    words = [w for w in command[1:] if not w.startswith("-")]
    for depth in (2, 1):
        if tuple(words[:depth]) in COMMANDS:
            return tuple(words[:depth])
    raise AssertionError(f"{command} is not a c2cserve subcommand")


def test_core_services_present(compose):
    assert {"nats", "redis", *CLIENT_SERVICES} <= set(compose["services"])


def test_c2cserve_commands_are_real_and_parse(compose):
    from services.cli import _add_module_arguments

    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or command[0] != "c2cserve":
            continue
        assert _command_path(command)
        args = _add_module_arguments(build_parser(), command[1:])  # the flags must parse too
        assert callable(args._run), name


def test_build_contexts_and_mounted_files_exist(compose, cluster_compose):
    built = [s for s in compose["services"].values() if "build" in s]
    assert built
    for service in built:
        context = ROOT / service["build"]["context"]
        assert context.is_dir()
        assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file()
    for service in [*compose["services"].values(), *cluster_compose["services"].values()]:
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./deploy"):
                assert (ROOT / source).is_file(), source


def test_gpu_worker_reserves_a_gpu_and_cpu_worker_is_a_profile(compose):
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert compose["services"]["worker-cpu"]["profiles"] == ["cpu"]
    for name in ("worker-gpu", "worker-cpu"):
        assert "container_name" not in compose["services"][name]  # so `--scale` works


@pytest.mark.parametrize(("relative", "missing"), [
    ("docker-compose.yml", "C2C_NATS_PASSWORD"), ("docker-compose.yml", "C2C_REDIS_PASSWORD"),
    ("deploy/compose.cluster.yml", "C2C_NATS_PASSWORD"),
])
def test_compose_refuses_to_start_without_a_password(credentials, relative, missing):
    env = {k: v for k, v in credentials.items() if k != missing}
    with pytest.raises(KeyError, match=missing):
        _load_compose(relative, env)


def test_gen_credentials_makes_url_safe_passwords(credentials):
    for name in ("C2C_NATS_PASSWORD", "C2C_REDIS_PASSWORD", "C2C_API_KEY"):
        assert re.fullmatch(r"[A-Za-z0-9]{32,}", credentials[name]), name
        assert re.search(r"[A-Za-z]", credentials[name]), f"{name}: nats-server reads all digits as a number"
    assert credentials["C2C_NATS_PASSWORD"] != credentials["C2C_REDIS_PASSWORD"]
    assert ".env" not in _git_tracked()


def _git_tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_only_the_gateway_is_published_and_on_loopback(compose, cluster_compose):
    published = {n for n, s in compose["services"].items() if s.get("ports")}
    assert published == {"gateway"}
    assert compose["services"]["gateway"]["ports"] == ["127.0.0.1:8000:8000"]
    assert not any(s.get("ports") for s in cluster_compose["services"].values())


def test_services_get_credentials_in_their_urls(compose, credentials):
    nats_password, redis_password = credentials["C2C_NATS_PASSWORD"], credentials["C2C_REDIS_PASSWORD"]
    for name in CLIENT_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["C2C_NATS_URL"] == f"nats://c2c:{nats_password}@nats:4222"
        assert env["C2C_REDIS_URL"] == f"redis://:{redis_password}@redis:6379/0"
        assert env["C2C_MODEL_ROOTS"] == "/models"
    assert compose["services"]["nats"]["environment"]["C2C_NATS_PASSWORD"] == nats_password
    redis = compose["services"]["redis"]
    assert '--requirepass "$C2C_REDIS_PASSWORD"' in redis["command"][-1]
    assert redis["environment"]["C2C_REDIS_PASSWORD"] == redis_password
    assert compose["services"]["gateway"]["environment"]["C2C_API_KEY"] == credentials["C2C_API_KEY"]


def test_service_configs_accept_the_compose_environment(compose, cluster_compose):
    for config_class, name in ((GatewayConfig, "gateway"), (PlacerConfig, "placer"), (WorkerConfig, "worker-cpu")):
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items()}
        assert load_config(config_class, environ=env, log_it=False).model_roots == "/models"
        env.update(cluster_compose["services"][name]["environment"])
        config = load_config(config_class, environ=env, log_it=False)
        assert len(config.nats_url.split(",")) == 3


def test_restart_policies_healthchecks_and_start_order(compose):
    for name, service in compose["services"].items():
        assert service.get("restart") == ("no" if name == "demo-models" else "unless-stopped"), name
    for name in ("nats", "redis", "gateway"):
        assert compose["services"][name]["healthcheck"]["test"], name
    assert "/health" in " ".join(compose["services"]["gateway"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(compose["services"]["nats"]["healthcheck"]["test"])
    for name in CLIENT_SERVICES:
        depends = compose["services"][name]["depends_on"]
        assert depends == {"nats": {"condition": "service_healthy"}, "redis": {"condition": "service_healthy"}}


def test_redis_is_persistent(compose):
    redis = compose["services"]["redis"]
    assert "--appendonly yes" in redis["command"][-1] and "--dir /data" in redis["command"][-1]
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]


def test_cluster_override_makes_three_routed_members(compose, cluster_compose, credentials):
    members = {n: s for n, s in cluster_compose["services"].items() if n.startswith("nats")}
    assert set(members) == {"nats", "nats-2", "nats-3"}
    names = {s["environment"]["C2C_NATS_SERVER_NAME"] for s in members.values()}
    assert len(names) == 3
    auth = f"c2c:{credentials['C2C_NATS_PASSWORD']}@"
    expected_routes = {f"nats://{auth}{host}:6222" for host in members}
    for name, member in members.items():
        routes = {v for k, v in member["environment"].items() if k.startswith("C2C_NATS_ROUTE_")}
        assert routes == expected_routes, name
        assert member["restart"] == "unless-stopped" and member["healthcheck"]["test"]
    for name in CLIENT_SERVICES:
        assert name in compose["services"]  # the override only touches existing services
        urls = cluster_compose["services"][name]["environment"]["C2C_NATS_URL"].split(",")
        assert urls == [f"nats://{auth}{host}:4222" for host in members]


def _nats_test_config(config: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([nats_server_binary(), "-t", "-c", str(ROOT / config)],
                          env=env, capture_output=True, text=True, timeout=30)


def test_nats_configs_need_credentials_and_are_valid_with_the_compose_environment(compose, cluster_compose):
    for config in ("deploy/nats.conf", "deploy/nats-cluster.conf"):
        done = _nats_test_config(config, {})
        assert done.returncode != 0 and "C2C_NATS_" in done.stderr + done.stdout, config
    single = _nats_test_config("deploy/nats.conf", compose["services"]["nats"]["environment"])
    assert single.returncode == 0, single.stderr
    for name in ("nats", "nats-2", "nats-3"):
        done = _nats_test_config("deploy/nats-cluster.conf", cluster_compose["services"][name]["environment"])
        assert done.returncode == 0, f"{name}: {done.stderr}"


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _containers(docs: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for d in docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")
            for c in d["spec"]["template"]["spec"]["containers"]}


def test_k8s_manifests_run_real_commands(k8s):
    from services.cli import _add_module_arguments

    commands = [c["command"] for c in _containers(k8s).values() if c.get("command", [""])[0] == "c2cserve"]
    assert {_command_path(c)[0] for c in commands} == {"gateway", "placer", "controller", "worker"}
    for command in commands:
        assert callable(_add_module_arguments(build_parser(), command[1:])._run)
    worker = _by_kind(k8s, "DaemonSet")["c2c-worker"]["spec"]["template"]["spec"]
    assert worker["hostIPC"] is True


def test_k8s_commits_no_secret_and_references_one(k8s):
    assert not _by_kind(k8s, "Secret"), "credentials come from deploy/gen-credentials.sh --k8s"
    generated = yaml.safe_load(subprocess.run(["sh", str(ROOT / "deploy/gen-credentials.sh"), "--k8s"],
                                              capture_output=True, text=True, check=True).stdout)
    refs = [e["valueFrom"]["secretKeyRef"] for c in _containers(k8s).values() for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs and {r["name"] for r in refs} == {generated["metadata"]["name"]}
    assert {r["key"] for r in refs} <= set(generated["stringData"])


def test_k8s_services_reach_nats_and_redis_with_credentials(k8s):
    env_config = _by_kind(k8s, "ConfigMap")["c2cserve-env"]["data"]
    assert env_config["C2C_MODEL_ROOTS"] == "/models"
    for name in ("gateway", "placer", "controller", "worker"):
        env = {e["name"]: e.get("value") for e in _containers(k8s)[name]["env"]}
        urls = env["C2C_NATS_URL"].split(",")
        assert urls == [f"nats://$(C2C_NATS_USER):$(C2C_NATS_PASSWORD)@c2c-nats-{i}.c2c-nats:4222" for i in range(3)]
        assert env["C2C_REDIS_URL"] == "redis://:$(C2C_REDIS_PASSWORD)@c2c-redis:6379/0"
        names = list(env)  # a $(VAR) expands only after VAR is defined
        assert names.index("C2C_NATS_PASSWORD") < names.index("C2C_NATS_URL"), name
    for service in _by_kind(k8s, "Service").values():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert 8222 not in {p["port"] for p in service["spec"]["ports"]}


def test_k8s_probes_and_restart_policies(k8s):
    for d in k8s:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            assert d["spec"]["template"]["spec"]["restartPolicy"] == "Always", d["metadata"]["name"]
    gateway = _containers(k8s)["gateway"]
    # /health is 503 while no worker heartbeats: a liveness probe on it would restart
    # healthy gateways; /metrics depends on nothing but the event loop
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    for name in ("nats", "redis"):
        assert _containers(k8s)[name]["livenessProbe"] and _containers(k8s)[name]["readinessProbe"], name


def test_k8s_redis_is_persistent_and_password_protected(k8s):
    redis = _by_kind(k8s, "StatefulSet")["c2c-redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--requirepass $(C2C_REDIS_PASSWORD)" in args
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]


def test_k8s_nats_is_a_three_member_routed_cluster(k8s):
    nats = _by_kind(k8s, "StatefulSet")["c2c-nats"]
    assert nats["spec"]["replicas"] == 3
    headless = _by_kind(k8s, "Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    config = _by_kind(k8s, "ConfigMap")["c2c-nats-config"]["data"]["nats.conf"]
    assert config == (ROOT / "deploy/nats-cluster.conf").read_text()
    container = nats["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    routes = sorted(v for k, v in env.items() if k.startswith("C2C_NATS_ROUTE_"))
    assert routes == [f"nats://$(C2C_NATS_USER):$(C2C_NATS_PASSWORD)@c2c-nats-{i}.c2c-nats:6222" for i in range(3)]
    defined = set(env) | set(_by_kind(k8s, "ConfigMap")["c2cserve-env"]["data"])
    uncommented = "\n".join(line.split("#")[0] for line in config.splitlines())
    assert set(re.findall(r"\$(\w+)", uncommented)) <= defined


async def test_compose_redis_command_demands_the_password_the_services_send(compose, tmp_path):
    """The compose Redis command, run by sh with the real valkey-server binary."""
    import redis.asyncio as aioredis

    from services.embedded import free_port, stop_processes, valkey_server_binary
    from services.natsutil import connect_redis

    redis = compose["services"]["redis"]
    port = free_port()
    script = redis["command"][-1].replace("valkey-server", valkey_server_binary(), 1).replace("/data", str(tmp_path))
    proc = subprocess.Popen([*redis["command"][:-1], f"{script} --port {port} --bind 127.0.0.1"],
                            env=redis["environment"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = compose["services"]["placer"]["environment"]["C2C_REDIS_URL"].replace("@redis:6379", f"@127.0.0.1:{port}")
        client = await connect_redis(url, timeout_s=30)
        assert await client.set("c2c:test", "1")
        await client.aclose()
        anonymous = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(aioredis.AuthenticationError):
            await anonymous.ping()
        await anonymous.aclose()
    finally:
        stop_processes([proc], timeout_s=5)
    assert (tmp_path / "appendonlydir").is_dir()  # the append-only file is on
