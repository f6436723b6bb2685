"""docker-compose.yml and deploy/k8s: every service runs a real `c2cserve` command.

No Docker engine or cluster here: the files are loaded as YAML (anchors resolved) and checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _command_path(command: list[str]) -> tuple[str, ...]:
    words = [w for w in command[1:] if not w.startswith("-")]
    for depth in (2, 1):
        if tuple(words[:depth]) in COMMANDS:
            return tuple(words[:depth])
    raise AssertionError(f"{command} is not a c2cserve subcommand")


def test_core_services_present(compose):
    assert {"nats", "redis", "gateway", "placer", "controller", "worker-gpu", "worker-cpu"} <= set(compose["services"])


def test_c2cserve_commands_are_real_and_parse(compose):
    from services.cli import _add_module_arguments

    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or command[0] != "c2cserve":
            continue
        assert _command_path(command)
        args = _add_module_arguments(build_parser(), command[1:])  # the flags must parse too
        assert callable(args._run), name


def test_build_contexts_exist(compose):
    built = [s for s in compose["services"].values() if "build" in s]
    assert built
    for service in built:
        context = ROOT / service["build"]["context"]
        assert context.is_dir()
        assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file()
    for service in compose["services"].values():
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
        assert "ports" not in compose["services"][name]


def test_k8s_manifests_run_real_commands():
    from services.cli import _add_module_arguments

    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/c2cserve.yaml").read_text()) if d]
    commands = [c["command"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")
                for c in d["spec"]["template"]["spec"]["containers"] if "command" in c]
    assert {_command_path(c)[0] for c in commands} == {"gateway", "placer", "controller", "worker"}
    for command in commands:
        assert callable(_add_module_arguments(build_parser(), command[1:])._run)
    worker = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert worker["hostIPC"] is True
