"""The discrete-event loop (heapq) of the cluster simulator.

Events: arrivals (read in order from the trace arrays), instance events (the next
sequence that finishes its prefill or its decode on an instance, recomputed whenever the
instance's cycle time changes; stale ones are skipped by version), load events (a copy
over the link finishes) and a periodic timer of the system (prewarm planning). Everything
a system decides (routing, loading, caching, knobs) is in `sim/systems.py`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from sim.catalog import Catalog, TraceArrays
from sim.cluster import EPS, Gpu, Instance, LoadFlow, Request, water_fill
from sim.cost_model import PROFILES, UNITS_PER_GPU

_INSTANCE, _LOAD, _TIMER = 0, 1, 2
MAX_DRAIN_S = 86400.0  # after the last arrival, give up on what has not finished a day later


class Simulator:
    def __init__(self, catalog: Catalog, trace: TraceArrays, system, num_gpus: int, link_gbps: float,
                 chunk: int = 512, max_seqs: int = 16, progress=None, initial_slices: int = UNITS_PER_GPU):
        self.catalog, self.trace, self.system = catalog, trace, system
        self.specs = catalog.specs
        self.gpus = [Gpu(g, link_gbps, UNITS_PER_GPU) for g in range(num_gpus)]
        self.initial_slices = initial_slices  # 1g slices c2cserve starts with per GPU
        self.chunk, self.max_seqs = chunk, max_seqs
        self.now = 0.0
        self.heap: list = []
        self.seq_no = 0
        self.requests: list[Request] = []
        self.pending: deque[Request] = deque()
        self.progress = progress
        self.next_iid = 0
        self.num_finished = 0
        self.num_rejected = 0
        self.num_events = 0

    # ---------------------------------------------------------------- main loop
    def run(self) -> list[Request]:
        """Replays the whole trace; returns every request (finished or rejected once)."""
        self.system.setup(self)
        period = self.system.timer_period_s
        if period:
            self._push(period, _TIMER, None, 0)
        t_arr, models = self.trace.t_s, self.trace.model
        prompts, outputs = self.trace.prompt, self.trace.output
        num, index, tick = len(t_arr), 0, max(1, len(t_arr) // 200)
        give_up_s = (float(t_arr[-1]) if num else 0.0) + MAX_DRAIN_S
        while True:
            t_next = t_arr[index] if index < num else math.inf
            if self.heap and self.heap[0][0] > give_up_s:
                break  # what is left cannot finish: counted as rejected below
            if self.heap and self.heap[0][0] <= t_next:
                self._dispatch(heapq.heappop(self.heap))
            elif index < num:
                self.now = float(t_next)
                self._arrive(index, int(models[index]), int(prompts[index]), int(outputs[index]))
                index += 1
                if self.progress is not None and index % tick == 0:
                    self.progress.update(tick)
            else:
                break
        for req in self.pending:
            self._reject(req)
        self.pending.clear()
        for req in self.requests:
            if req.t_done is None and not req.rejected:
                self._reject(req)
        return self.requests

    def _dispatch(self, event) -> None:
        t_s, _, kind, obj, version = event
        if obj is not None and obj.version != version:
            return
        self.now = t_s
        self.num_events += 1
        if kind == _INSTANCE:
            self._instance_event(obj)
        elif kind == _LOAD:
            self._load_done(obj)
        elif self.requests_left():
            self.system.on_timer(self, t_s)
            self._push(t_s + self.system.timer_period_s, _TIMER, None, 0)

    def requests_left(self) -> bool:
        return self.num_finished + self.num_rejected < len(self.trace.t_s)

    def _push(self, t_s: float, kind: int, obj, version: int) -> None:
        self.seq_no += 1
        heapq.heappush(self.heap, (t_s, self.seq_no, kind, obj, version))

    # ---------------------------------------------------------------- requests
    def _arrive(self, rid: int, model: int, prompt: int, output: int) -> None:
        cat = self.catalog
        req = Request(rid, model, self.now, prompt, output, cat.ttft_slo_for(model, prompt), cat.tpot_slo_s[model])
        self.requests.append(req)
        self._route(req)

    def _route(self, req: Request) -> bool:
        target = self.system.route(self, req)
        req.num_tries += 1
        if target == "reject":
            self._reject(req)
        elif target is None:
            self.pending.append(req)
            return False
        else:
            self.assign(req, target)
        return True

    def _reject(self, req: Request) -> None:
        req.rejected = True
        self.num_rejected += 1

    def assign(self, req: Request, inst: Instance) -> None:
        inst.advance(self.now)
        req.instance = inst
        req.is_cold = self.system.on_assign(self, inst, req)
        inst.add_ref(req.model)
        inst.queued_prompt_tokens += req.prompt
        inst.queue.append(req)
        inst.last_used_s = self.now
        self._admit(inst)
        self.refresh(inst)

    def _admit(self, inst: Instance) -> None:
        if not inst.queue:
            return
        kept = deque()
        while inst.queue:
            req = inst.queue.popleft()
            if inst.num_active < inst.max_seqs and req.model in inst.ready:
                self.seq_no += 1
                inst.push_prefill(req, self.seq_no)
            else:
                kept.append(req)
        inst.queue = kept
        if inst.prefill_head is None:
            self._start_prefill(inst)

    def _start_prefill(self, inst: Instance) -> None:
        if not inst.prefill:
            inst.prefill_head, inst.prefill_target = None, math.inf
            return
        _, _, req = heapq.heappop(inst.prefill)
        inst.start_prefill(req)

    # ---------------------------------------------------------------- instance events
    def _instance_event(self, inst: Instance) -> None:
        inst.advance(self.now)
        freed = False
        while inst.decode and inst.decode[0][0] <= inst.v + EPS:
            _, _, req = heapq.heappop(inst.decode)
            self._finish_decode(inst, req)
            freed = True
        head = inst.prefill_head
        if head is not None and inst.prefill_target <= inst.v + EPS:
            self._finish_prefill(inst, head)
            freed = True
        self._admit(inst)
        self.system.on_event(self, inst)
        self.refresh(inst)
        if freed:
            self.drain_pending()

    def _finish_prefill(self, inst: Instance, req: Request) -> None:
        req.t_first = self.now
        inst.queued_prompt_tokens -= req.prompt
        ttft_ms = 1000.0 * (self.now - req.t_arrival)
        inst.ttft_ewma_ms = ttft_ms if inst.ttft_ewma_ms is None else 0.7 * inst.ttft_ewma_ms + 0.3 * ttft_ms
        inst.prefill_head = None
        self.system.on_prefill_done(self, inst, req)
        if req.output > 1:
            self.seq_no += 1
            inst.push_decode(req, self.seq_no, self.specs[req.model].kv_bytes_per_token)
        else:
            self._complete(inst, req)
        self._start_prefill(inst)

    def _finish_decode(self, inst: Instance, req: Request) -> None:
        inst.pop_decode(req, self.specs[req.model].kv_bytes_per_token)
        self._complete(inst, req)

    def _complete(self, inst: Instance, req: Request) -> None:
        req.t_done = self.now
        inst.drop_ref(req.model)
        inst.last_used_s = self.now
        self.num_finished += 1
        self.system.on_finish(self, inst, req)

    def drain_pending(self, max_tries: int = 4, max_failures: int = 2) -> None:
        """Retry a few waiting requests, oldest first. One that still finds no slice keeps
        its place but does not block the next; after `max_failures` the cluster is full."""
        still = []
        for _ in range(min(max_tries, len(self.pending))):
            req = self.pending.popleft()
            if not self._route(req):
                self.pending.pop()  # _route queued it at the back
                still.append(req)
                if len(still) >= max_failures:
                    break
        self.pending.extendleft(reversed(still))

    # ---------------------------------------------------------------- link sharing
    def refresh(self, inst: Instance) -> None:
        """Recompute an instance's costs; re-share its GPU's link if its demand moved."""
        inst.advance(self.now)
        old_demand = inst.demand_gbps
        inst.recompute_costs(self.specs, self.system.rho_of)
        demand = inst.demand_gbps
        moved = abs(demand - old_demand) > 0.02 * max(old_demand, 1e-3)
        starved = demand > 0 and inst.alloc_gbps < 0.98 * demand and inst.gpu.demand_gbps < inst.gpu.link_gbps
        if moved or starved or inst.alloc_gbps > demand:
            self.reshare(inst.gpu)
        else:
            self._reschedule(inst)

    def reshare(self, gpu: Gpu) -> None:
        flows = gpu.instances + gpu.loads
        for flow in flows:
            flow.advance(self.now)
        weights = [float(f.prof.units) for f in gpu.instances] + [f.weight for f in gpu.loads]
        demands = [f.demand_gbps for f in flows]
        gpu.demand_gbps = sum(demands)
        shares = water_fill(demands, gpu.link_gbps, weights)
        for flow, share in zip(flows, shares, strict=True):
            flow.alloc_gbps = share
        for inst in gpu.instances:
            self._reschedule(inst)
        for flow in gpu.loads:
            flow.version += 1
            self._push(flow.next_event_s(), _LOAD, flow, flow.version)

    def _reschedule(self, inst: Instance) -> None:
        inst.apply_alloc()
        inst.version += 1
        t_next = inst.next_event_s()
        period = self.system.control_period_s
        if period and inst.prefill_head is not None:  # let the controller see a long prefill
            t_next = min(t_next, self.now + period)
        if t_next < math.inf:
            self._push(t_next, _INSTANCE, inst, inst.version)

    # ---------------------------------------------------------------- loads
    def start_load(self, inst: Instance, model: int, nbytes: float, demand_gbps: float, tag: str = "load",
                   weight: float = 1.0) -> LoadFlow:
        flow = LoadFlow(inst, model, nbytes, demand_gbps)
        flow.t_last = self.now
        flow.tag, flow.weight = tag, weight
        inst.gpu.loads.append(flow)
        self.reshare(inst.gpu)
        return flow

    def _load_done(self, flow: LoadFlow) -> None:
        flow.advance(self.now)
        if flow.remaining_bytes > 1.0:
            flow.version += 1
            self._push(flow.next_event_s(), _LOAD, flow, flow.version)
            return
        gpu = flow.instance.gpu
        gpu.loads.remove(flow)
        flow.version += 1
        self.system.on_load_done(self, flow)
        inst = flow.instance
        if inst.alive:
            inst.advance(self.now)
            self._admit(inst)
            inst.recompute_costs(self.specs, self.system.rho_of)
        self.reshare(gpu)
        self.drain_pending()

    # ---------------------------------------------------------------- instances
    def create_instance(self, gpu: Gpu, profile: str) -> Instance:
        prof = PROFILES[profile]
        if gpu.free_units < prof.units:
            raise RuntimeError(f"gpu {gpu.gid} has {gpu.free_units} free units, {profile} needs {prof.units}")
        inst = Instance(self.next_iid, gpu, prof, self.chunk, self.max_seqs * prof.units)  # batch cap per unit
        self.next_iid += 1
        inst.t_last = inst.last_used_s = self.now
        gpu.instances.append(inst)
        self.system.on_create(self, inst)
        return inst

    def destroy_instance(self, inst: Instance) -> None:
        inst.alive = False
        inst.version += 1
        inst.gpu.instances.remove(inst)
        self.system.on_destroy(self, inst)

    def find_room(self, units: int, gpu_key=None) -> Gpu | None:
        """A GPU with `units` free, evicting least-recently-used idle instances if needed.

        Among GPUs that can make room, the one with the smallest `gpu_key(gpu)` wins
        (default: free units first, then the oldest victims, i.e. LRU).
        """
        room = self.pick_room(units, gpu_key)
        if room is None:
            return None
        gpu, victims = room
        for inst in victims:
            self.destroy_instance(inst)
        return gpu

    def pick_room(self, units: int, gpu_key=None) -> tuple[Gpu, list[Instance]] | None:
        """Where `find_room` would make room, and which idle instances it would evict;
        changes nothing (the placer predicts a plan on that GPU before choosing it)."""
        best, best_cost, best_victims = None, None, None
        for gpu in self.gpus:
            free, victims = gpu.free_units, []
            if free < units:
                for inst in sorted((i for i in gpu.instances if i.is_idle()), key=lambda i: i.last_used_s):
                    victims.append(inst)
                    free += inst.prof.units
                    if free >= units:
                        break
            if free < units:
                continue
            lru_cost = victims[-1].last_used_s if victims else -math.inf
            cost = (gpu_key(gpu), lru_cost) if gpu_key is not None else (lru_cost,)
            if best_cost is None or cost < best_cost:
                best, best_cost, best_victims = gpu, cost, victims
                if gpu_key is None and not victims:
                    break
        if best is None:
            return None
        return best, best_victims
