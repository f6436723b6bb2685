"""Baseline systems: ServerlessLLM-like loading, dedicated instances, GPU time-sharing.

Assumptions (also in docs/cost_model.md), chosen to be generous to the baselines:
- every model's checkpoint is already in the node's host memory (no SSD read);
- a cold start copies the whole model over the link at the measured memcpy rate
  (`SLLM_LOADER_GBPS`, shared with the GPU's other link traffic) plus `init_s`;
- MIG reconfiguration is free and instant (for every system);
- an idle instance keeps its model until its units are needed (keep-alive forever, LRU).
"""

from __future__ import annotations

from sim.cluster import Instance, Request
from sim.cost_model import (
    PROFILES,
    SLLM_INIT_S,
    SLLM_LOADER_GBPS,
    kv_reserve_bytes,
    smallest_fitting_profile,
)
from sim.systems import QUEUE_FACTOR, System


class ServerlessLLM(System):
    name = "serverlessllm"

    def __init__(self, loader_gbps: float = SLLM_LOADER_GBPS, init_s: float = SLLM_INIT_S):
        self.loader_gbps, self.init_s = loader_gbps, init_s
        self.model_instances: dict[int, list[Instance]] = {}

    def setup(self, sim) -> None:
        self.profile_of = [smallest_fitting_profile(s) for s in sim.specs]

    def route(self, sim, req: Request):
        profile = self.profile_of[req.model]
        if profile is None:
            return "reject"  # does not fit one GPU
        live = self.model_instances.get(req.model, ())
        best = min(live, key=lambda i: i.num_queued) if live else None
        if best is not None and best.num_queued < best.max_seqs:
            return best
        gpu = sim.find_room(PROFILES[profile].units)  # scale out: a new (cold) instance
        if gpu is None:
            return best if best is not None and best.num_queued < QUEUE_FACTOR * best.max_seqs else None
        inst = sim.create_instance(gpu, profile)
        inst.model = req.model
        self.model_instances.setdefault(req.model, []).append(inst)
        inst.loading.add(req.model)
        # the init overhead is modelled as extra bytes at the loader rate
        extra = self.init_s * self.loader_gbps * 1e9
        sim.start_load(inst, req.model, sim.specs[req.model].weight_bytes + extra, self.loader_gbps)
        return inst

    def on_assign(self, sim, inst: Instance, req: Request) -> bool:
        return req.model in inst.loading

    def on_load_done(self, sim, flow) -> None:
        flow.instance.loading.discard(flow.model)
        flow.instance.ready.add(flow.model)

    def on_destroy(self, sim, inst: Instance) -> None:
        self.model_instances[inst.model].remove(inst)


class Dedicated(System):
    """One instance per model (popular models first), spare units to the busiest models."""

    name = "dedicated"

    def __init__(self, expected_rps: list[float] | None = None):
        self.expected_rps = expected_rps
        self.model_instances: dict[int, list[Instance]] = {}

    def setup(self, sim) -> None:
        num_models = len(sim.specs)
        rps = self.expected_rps or [1.0 / (k + 1) for k in range(num_models)]
        profile_of = [smallest_fitting_profile(s) for s in sim.specs]
        order = sorted(range(num_models), key=lambda m: -rps[m])
        for model in order:
            if profile_of[model] is not None and rps[model] > 0:
                if not self._place(sim, model, profile_of[model]):
                    break
        while True:  # replicas: the model with the most expected load per instance
            served = [m for m in self.model_instances if rps[m] > 0]
            if not served:
                return
            model = max(served, key=lambda m: rps[m] / len(self.model_instances[m]))
            if not self._place(sim, model, profile_of[model]):
                return

    def _place(self, sim, model: int, profile: str) -> bool:
        units = PROFILES[profile].units
        gpu = next((g for g in sim.gpus if g.free_units >= units), None)
        if gpu is None:
            return False
        inst = sim.create_instance(gpu, profile)
        inst.ready.add(model)
        self.model_instances.setdefault(model, []).append(inst)
        return True

    def route(self, sim, req: Request):
        instances = self.model_instances.get(req.model)
        if not instances:
            return "reject"
        return min(instances, key=lambda i: i.num_queued)


class TimeShare(System):
    """Whole GPUs; each keeps several models in HBM (LRU by bytes) and time-slices steps."""

    name = "timeshare"

    def __init__(self, loader_gbps: float = SLLM_LOADER_GBPS):
        self.loader_gbps = loader_gbps
        self.model_instances: dict[int, set[Instance]] = {}

    def setup(self, sim) -> None:
        self.specs = sim.specs
        self.instances = [sim.create_instance(gpu, "7g.96gb") for gpu in sim.gpus]
        for inst in self.instances:
            inst.resident_s = {}  # model -> last use

    def route(self, sim, req: Request):
        spec = sim.specs[req.model]
        if spec.weight_bytes + kv_reserve_bytes(spec) > PROFILES["7g.96gb"].usable_bytes:
            return "reject"
        holders = self.model_instances.get(req.model, ())
        best = min(holders, key=lambda i: i.num_queued) if holders else None
        if best is not None and best.num_queued < best.max_seqs:
            return best
        for inst in sorted(self.instances, key=lambda i: i.num_queued):  # scale out: load a copy
            if inst.num_queued >= inst.max_seqs:
                break
            if inst not in holders and self._make_room(inst, req.model):
                inst.loading.add(req.model)
                inst.resident_s[req.model] = sim.now
                self.model_instances.setdefault(req.model, set()).add(inst)
                sim.start_load(inst, req.model, spec.weight_bytes, self.loader_gbps)
                return inst
        return best if best is not None and best.num_queued < QUEUE_FACTOR * best.max_seqs else None

    def _make_room(self, inst: Instance, model: int) -> bool:
        """Evict least recently used idle models until `model` fits next to the KV reserve."""
        spec = self.specs[model]
        resident = sum(self.specs[m].weight_bytes for m in inst.resident_s)
        reserve = max(kv_reserve_bytes(self.specs[m]) for m in list(inst.resident_s) + [model])
        need = resident + spec.weight_bytes + reserve - inst.prof.usable_bytes
        if need <= 0:
            return True
        busy = set(inst.active_models()) | inst.loading
        idle = sorted((m for m in inst.resident_s if m not in busy), key=inst.resident_s.get)
        if sum(self.specs[m].weight_bytes for m in idle) < need:
            return False
        for victim in idle:
            if need <= 0:
                break
            need -= self.specs[victim].weight_bytes
            del inst.resident_s[victim]
            inst.ready.discard(victim)
            self.model_instances[victim].discard(inst)
        return True

    def on_assign(self, sim, inst: Instance, req: Request) -> bool:
        inst.resident_s[req.model] = sim.now
        return req.model in inst.loading

    def on_finish(self, sim, inst: Instance, req: Request) -> None:
        inst.resident_s[req.model] = sim.now

    def on_load_done(self, sim, flow) -> None:
        flow.instance.loading.discard(flow.model)
        flow.instance.ready.add(flow.model)

