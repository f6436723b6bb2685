"""The worker-state contract: every field of `WorkerState` that the placer's or the
controller's policy reads is produced, with a live value, by a running worker.

Part one finds the fields the policies read by running them on a recording wrapper of a
state record, over inputs chosen to take each of their branches. Part two runs a real
cluster (NATS, Valkey, gateway, placer, a worker) under load and collects the worker's
telemetry until every one of those fields has shown a value other than its default. A
policy input that only the simulator fills fails here.
"""

from __future__ import annotations

import asyncio
import threading

import msgspec
import nats
import openai
import pytest

from controller.policy import SLO, Knobs, WorkerController
from placer.policy import DemandForecaster, RequestView, choose_slice, plan_prewarm, route_score
from placer.rebalance import plan_moves
from services import subjects
from services.launcher import LocalCluster
from services.schemas import WorkerState, decoder

CEILING_S = 240.0  # generous: a busy 2-core machine


class Recording:
    """Reads through to a WorkerState and records which fields were read."""

    def __init__(self, state: WorkerState, read: set[str]):
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_read", read)

    def __getattr__(self, name: str):
        self._read.add(name)
        return getattr(self._state, name)


def _states() -> list[WorkerState]:
    """States that take the policies' branches: link known or not, cycle, backlog, SLOs."""
    base = WorkerState("w", node="n", gpu="g", models=["m"], active_models=["m"], cached_fraction={"m": 0.5},
                       num_running=2,
                       num_waiting=3, max_num_seqs=8, kv_free_frac=0.05, link_util=0.5, pinned_models=["m"],
                       queued_prefill_tokens=500, prefill_tokens_per_s=1000.0, t_s=10.0,
                       ttft_p50_ms=3000.0, tpot_p50_ms=300.0, oldest_wait_ms=4000.0, ttft_slo_ms=500.0,
                       tpot_slo_ms=100.0, step_ms=50.0, cycle_ms=80.0)
    return [
        base,
        msgspec.structs.replace(base, link_gbps=95.0, link_capacity_gbps=100.0, link_demand_gbps=90.0, t_s=20.0),
        msgspec.structs.replace(base, models=[], active_models=[], pinned_models=[], tpot_p50_ms=10.0,
                                kv_free_frac=0.9, t_s=30.0),
        msgspec.structs.replace(base, ttft_p50_ms=None, tpot_p50_ms=None, oldest_wait_ms=None, t_s=40.0),
    ]


def policy_fields() -> set[str]:
    """The WorkerState fields the placer's routing, prewarm and rebalance plans and the
    controller's law read, over the branch-taking states above."""
    read: set[str] = set()
    forecaster = DemandForecaster()
    for t in range(20):
        forecaster.observe("m2", float(t))
    for state in _states():
        for model in ("m", "m2"):
            for req in (RequestView("r", model, 100), RequestView("r", model, 100, "interactive", est_step_ms=30.0,
                                                                  tpot_slo_ms=100.0, ttft_slo_ms=500.0)):
                choose_slice(req, [Recording(state, read)])
                route_score(req, Recording(state, read))
        plan_prewarm(forecaster, [Recording(state, read)], {"m": 10**9, "m2": 10**9}, 20.0, {"w": 10**9})
        idle = msgspec.structs.replace(state, worker_id="w2", num_running=0, num_waiting=0)
        plan_moves([Recording(state, read), Recording(idle, read)])
        controller = WorkerController(SLO(), Knobs())
        for k in range(3):
            controller.update(Recording(msgspec.structs.replace(state, t_s=state.t_s + k), read))
    return read & set(WorkerState.__struct_fields__)


def test_policies_read_the_record_fields_the_review_found_unfilled():
    fields = policy_fields()
    # the inputs the issue names: link demand and use, step cycle, prefill backlog, live batch cap, SLOs
    for name in ("link_demand_gbps", "link_capacity_gbps", "link_util", "link_gbps", "cycle_ms",
                 "queued_prefill_tokens", "prefill_tokens_per_s", "max_num_seqs", "oldest_wait_ms",
                 "ttft_slo_ms", "tpot_slo_ms"):
        assert name in fields, name


@pytest.fixture(scope="module")
def cluster(servers, tiny_model):
    model_dir = tiny_model("llama")
    # dedicated: the worker is pinned to the model, so pinned_models is live too; a batch cap
    # other than the default shows that the record carries the engine's own value
    with LocalCluster([model_dir], num_workers=1, residency="dedicated", pinned={0: [model_dir.name]},
                      nats_url=servers.nats_url, redis_url=servers.redis_url,
                      extra_env={"C2C_MAX_NUM_SEQS": "12", "C2C_PREWARM_INTERVAL_S": "0"}) as running:
        yield running, model_dir.name


def _defaults() -> dict[str, object]:
    empty = WorkerState("")
    return {name: getattr(empty, name) for name in WorkerState.__struct_fields__}


def test_every_field_a_policy_reads_is_produced_live(cluster):
    running, model = cluster
    fields = policy_fields() - {"worker_id", "node", "gpu", "backend", "t_s"}  # identity and clock
    defaults = _defaults()
    produced: set[str] = set()
    slos: set[tuple[float, float]] = set()
    lock = threading.Lock()

    async def collect(stop: asyncio.Event) -> None:
        nc = await nats.connect(running.nats_url)
        dec = decoder(WorkerState)

        async def on_state(msg):
            state = dec.decode(msg.data)
            with lock:
                produced.update(n for n in fields if getattr(state, n) != defaults[n])
                slos.add((state.ttft_slo_ms, state.tpot_slo_ms))

        await nc.subscribe(subjects.TELEMETRY_ALL, cb=on_state)
        await stop.wait()
        await nc.drain()

    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "the state of a worker " * 150  # a prefill long enough to be seen waiting

    def load_round() -> None:
        threads = [threading.Thread(target=client.completions.create,
                                    kwargs=dict(model=model, prompt=prompt, max_tokens=24, temperature=0.0,
                                                extra_body={"slo_class": "interactive"}))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(collect(stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CEILING_S
        while loop.time() < deadline:
            await asyncio.to_thread(load_round)
            with lock:
                if fields <= produced:
                    break
        stop.set()
        await task

    asyncio.run(main())
    missing = sorted(fields - produced)
    assert not missing, f"policy inputs a live worker never produced: {missing}"
    # the requests' class reached the worker's record: interactive = half the defaults
    assert (500.0, 100.0) in slos, slos
