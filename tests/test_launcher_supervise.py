"""A supervised LocalCluster (what `c2cserve up` runs) recovers from kill -9 of each of
its processes in turn: controller, placer, worker, gateway, nats-server, valkey-server.
After each kill the process is back (a new pid) and a greedy request answers exactly the
engine's own text again. Every wait polls with a generous ceiling; recovery times are
printed (`pytest -s`), never asserted tight.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import urllib.error
import urllib.request

import pytest
import redis
from failover import failover_cluster

from services import keys
from services.launcher import LocalCluster

PROMPT = "The quick brown fox"
MAX_TOKENS = 8
CEILING_S = 120.0
KILL_ORDER = ("controller", "placer", "worker", "gateway", "nats-server", "valkey-server")


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def expected(model_dir, greedy_texts):
    return greedy_texts(model_dir, [PROMPT], MAX_TOKENS, ignore_eos=False)[PROMPT]


@pytest.fixture(scope="module")
def cluster(model_dir):
    with failover_cluster([model_dir], num_workers=1, supervise=True) as running:
        yield running


def _complete(url: str, model_id: str) -> str | None:
    """The greedy completion's text, or None when the cluster does not serve it right now."""
    body = json.dumps({"model": model_id, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())["choices"][0]["text"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def _wait_serving(cluster: LocalCluster, model_id: str, expected: str, since_s: float) -> float:
    """Seconds from `since_s` until a request answers `expected`; fails past the ceiling."""
    last = None
    while time.monotonic() < since_s + CEILING_S:
        last = _complete(cluster.url, model_id)
        if last == expected:
            return time.monotonic() - since_s
        time.sleep(0.5)
    raise AssertionError(f"not serving {expected!r} again within {CEILING_S:.0f} s (last answer {last!r})")


def _wait_restarted(cluster: LocalCluster, name: str, old_pid: int, since_s: float) -> float:
    while time.monotonic() < since_s + CEILING_S:
        try:
            if cluster.pid(name) != old_pid:
                return time.monotonic() - since_s
        except KeyError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{name} was not restarted within {CEILING_S:.0f} s:\n{cluster.log_tail(name)}")


def _name(cluster: LocalCluster, target: str) -> str:
    return cluster.worker_ids[0] if target == "worker" else target


def test_serves_after_kill_9_of_each_process(cluster, model_dir, expected):
    assert _wait_serving(cluster, model_dir.name, expected, time.monotonic()) < CEILING_S
    recovery_s = {}
    for target in KILL_ORDER:
        name = _name(cluster, target)
        old_pid = cluster.pid(name)
        killed_s = time.monotonic()
        cluster.kill(name, signal.SIGKILL)
        restarted_s = _wait_restarted(cluster, name, old_pid, killed_s)
        recovery_s[target] = _wait_serving(cluster, model_dir.name, expected, killed_s)
        print(f"kill -9 {target}: restarted after {restarted_s:.1f} s, serving again after {recovery_s[target]:.1f} s")
    print("recovery (s): " + ", ".join(f"{t} {s:.1f}" for t, s in recovery_s.items()))


def test_catalog_comes_back_when_its_keys_vanish(cluster, model_dir, expected):
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        client.delete(keys.model(model_dir.name))
        deleted_s = time.monotonic()
        while not client.exists(keys.model(model_dir.name)):
            assert time.monotonic() < deleted_s + CEILING_S, "the catalog was not re-registered"
            time.sleep(0.1)
        print(f"catalog re-registered {time.monotonic() - deleted_s:.1f} s after its key vanished")
    finally:
        client.close()
    _wait_serving(cluster, model_dir.name, expected, time.monotonic())


def test_a_gracefully_stopped_worker_is_started_again(cluster, model_dir, expected, caplog):
    """SIGTERM: the worker leaves cleanly (exit 0, logged as not a crash) and the
    supervisor starts it again, keeping the cluster at the size it was asked for."""
    caplog.set_level(logging.INFO, logger="services.supervisor")
    name = cluster.worker_ids[0]
    old_pid = cluster.pid(name)
    stopped_s = time.monotonic()
    cluster.kill(name, signal.SIGTERM)
    print(f"worker SIGTERM: restarted after {_wait_restarted(cluster, name, old_pid, stopped_s):.1f} s")
    print(f"worker SIGTERM: serving after {_wait_serving(cluster, model_dir.name, expected, stopped_s):.1f} s")
    exits = [r.getMessage() for r in caplog.records if r.getMessage().startswith(name)]
    assert any("stopped gracefully (exit 0" in m for m in exits), exits
