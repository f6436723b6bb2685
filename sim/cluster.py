"""State of the simulated cluster: requests, instances (MIG slices), GPUs and their links.

Fluid model of an instance: its steps cycle over the models that have work (one model's
batch per step, as `worker/step_policy.py` picks them); a cycle of length T gives every
decoding sequence one token and the prefill at the head of the queue one chunk. `v` counts
cycles done; a sequence finishes when `v` reaches its target, so nothing per token runs.
T changes only at events (a sequence joins or leaves, the link share or a knob changes).

The link of a GPU is shared by its instances' streams and by loads (baselines) with
max-min fairness (processor sharing, `water_fill`).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from sim.cost_model import GB, STEP_OVERHEAD_S, STREAM_EFFICIENCY, ModelSpec, Profile, step_costs

EPS = 1e-9
SOLO_CHUNK_MAX = 2048  # prefill chunk when no sequence decodes (one pass over the weights)


class Request:
    __slots__ = ("rid", "model", "t_arrival", "prompt", "output", "ttft_slo", "tpot_slo",
                 "t_first", "t_done", "is_cold", "instance", "rejected", "deadline", "num_tries")

    def __init__(self, rid, model, t_arrival, prompt, output, ttft_slo, tpot_slo):
        self.rid, self.model, self.t_arrival = rid, model, t_arrival
        self.prompt, self.output = prompt, output
        self.ttft_slo, self.tpot_slo = ttft_slo, tpot_slo
        self.t_first = self.t_done = None
        self.is_cold = False
        self.instance = None
        self.rejected = False
        self.num_tries = 0  # routing attempts (a waiting request is retried)
        self.deadline = t_arrival + ttft_slo  # step_policy.deadline_s of a prefill sequence


class Instance:
    """One MIG instance. `ready` models can run steps; `cached_bytes` are c2cserve tiles."""

    def __init__(self, iid: int, gpu: Gpu, prof: Profile, chunk: int, max_seqs: int):
        self.iid, self.gpu, self.prof = iid, gpu, prof
        self.chunk, self.max_seqs = chunk, max_seqs
        self.ready: set[int] = set()  # models whose weights are usable now
        self.cached_bytes: dict[int, float] = {}  # model -> bytes of tiles in HBM
        self.queue: deque[Request] = deque()  # assigned, not admitted yet
        self.prefill: list[tuple[float, int, Request]] = []  # admitted, heap by deadline
        self.prefill_target = math.inf  # cycles at which the head's prefill finishes
        self.prefill_head: Request | None = None
        self.head_chunk = chunk  # chunk of the running prefill (whole prompt when alone)
        self.decode: list[tuple[float, int, Request]] = []  # heap by target cycle
        self.model_decode: dict[int, list] = {}  # model -> [num decoding, ctx tokens]
        self.model_refs: dict[int, int] = {}  # model -> requests on the instance
        self.kv_bytes = 0.0  # KV held by decoding sequences
        self.queued_prompt_tokens = 0  # prompts assigned here and not prefilled yet
        self.v = 0.0
        self.t_last = 0.0
        self.cycle_s = math.inf
        self.t0_s = 0.0
        self.host_bytes = 0.0
        self.demand_gbps = 0.0
        self.alloc_gbps = 0.0
        self.version = 0
        self.last_used_s = 0.0
        self.loading: set[int] = set()
        self.ctl = None  # controller state (c2cserve)
        self.ttft_ewma_ms: float | None = None
        self.alive = True

    def __hash__(self) -> int:  # by id number: sets of instances iterate the same every run
        return self.iid

    # ---- load and occupancy
    @property
    def num_active(self) -> int:
        return len(self.decode) + len(self.prefill) + (self.prefill_head is not None)

    @property
    def num_queued(self) -> int:
        return self.num_active + len(self.queue)

    def is_idle(self) -> bool:
        return self.num_queued == 0 and not self.loading

    def active_models(self) -> dict[int, int]:
        """model -> number of its requests on this instance (queued, prefilling, decoding)."""
        return self.model_refs

    def kv_used_bytes(self, specs: list[ModelSpec] | None = None) -> float:
        return self.kv_bytes

    # ---- progress
    def advance(self, t_s: float) -> None:
        if self.cycle_s < math.inf and t_s > self.t_last:
            self.v += (t_s - self.t_last) / self.cycle_s
        self.t_last = t_s

    def next_event_s(self) -> float:
        target = self.prefill_target
        if self.decode and self.decode[0][0] < target:
            target = self.decode[0][0]
        if target == math.inf or self.cycle_s == math.inf:
            return math.inf
        return self.t_last + max(0.0, target - self.v) * self.cycle_s

    def recompute_costs(self, specs: list[ModelSpec], rho_of) -> None:
        """Cycle time with an unlimited link (t0_s), host bytes per cycle, link demand."""
        t0 = host = 0.0
        num_models = 0
        head = self.prefill_head
        for model, (num_dec, ctx) in self.model_decode.items():
            if num_dec <= 0 or model not in self.ready:
                continue
            tokens = num_dec + (self._chunk_tokens(head) if head is not None and head.model == model else 0)
            t, h = step_costs(specs[model], self.prof, tokens, ctx, rho_of(self, model))
            t0, host, num_models = t0 + t, host + h, num_models + 1
        if head is not None and head.model in self.ready and self.model_decode.get(head.model, (0,))[0] <= 0:
            t, h = step_costs(specs[head.model], self.prof, self._chunk_tokens(head), 0, rho_of(self, head.model))
            t0, host, num_models = t0 + t, host + h, num_models + 1
        self.t0_s, self.host_bytes = t0, host
        compute_s = max(EPS, t0 - num_models * STEP_OVERHEAD_S)
        want_gbps = host / GB / compute_s / STREAM_EFFICIENCY  # link share it would need
        self.demand_gbps = min(self.prof.link_cap_gbps, want_gbps) if host > 0 else 0.0
        self._num_models = num_models

    def apply_alloc(self) -> None:
        """Cycle time under the current link allocation."""
        if self.t0_s <= 0:
            self.cycle_s = math.inf
            return
        if self.host_bytes <= 0:
            self.cycle_s = self.t0_s
            return
        link_s = self.host_bytes / GB / max(EPS, self.alloc_gbps * STREAM_EFFICIENCY) + self._num_models * STEP_OVERHEAD_S
        self.cycle_s = max(self.t0_s, link_s)

    def _chunk_tokens(self, head: Request) -> int:
        return max(1, min(self.head_chunk, head.prompt))

    def start_prefill(self, req: Request) -> None:
        """No decode to protect: the whole prompt in one step (one pass over the weights)."""
        self.prefill_head = req
        self.head_chunk = max(self.chunk, min(req.prompt, SOLO_CHUNK_MAX)) if not self.decode else self.chunk
        self.prefill_target = self.v + max(1.0, req.prompt / max(1, self.head_chunk))

    # ---- queues
    def push_prefill(self, req: Request, seq_no: int) -> None:
        heapq.heappush(self.prefill, (req.deadline, seq_no, req))

    def push_decode(self, req: Request, seq_no: int, kv_bytes_per_token: float) -> None:
        heapq.heappush(self.decode, (self.v + req.output - 1, seq_no, req))
        nc = self.model_decode.setdefault(req.model, [0, 0.0])
        nc[0] += 1
        nc[1] += req.prompt + req.output / 2  # mean context over its decode
        self.kv_bytes += kv_bytes_per_token * (req.prompt + req.output / 2)

    def pop_decode(self, req: Request, kv_bytes_per_token: float) -> None:
        counts = self.model_decode[req.model]
        counts[0] -= 1
        counts[1] -= req.prompt + req.output / 2
        if counts[0] <= 0:
            del self.model_decode[req.model]
        self.kv_bytes = max(0.0, self.kv_bytes - kv_bytes_per_token * (req.prompt + req.output / 2))

    def add_ref(self, model: int) -> None:
        self.model_refs[model] = self.model_refs.get(model, 0) + 1

    def drop_ref(self, model: int) -> None:
        left = self.model_refs[model] - 1
        if left:
            self.model_refs[model] = left
        else:
            del self.model_refs[model]


class LoadFlow:
    """A copy of weights over the link (loading baselines)."""

    __slots__ = ("instance", "model", "remaining_bytes", "t_last", "alloc_gbps", "demand_gbps", "version", "tag",
                 "nbytes", "weight")

    def __init__(self, instance: Instance, model: int, nbytes: float, demand_gbps: float):
        self.instance, self.model = instance, model
        self.remaining_bytes = self.nbytes = nbytes
        self.t_last = 0.0
        self.alloc_gbps = 0.0
        self.demand_gbps = demand_gbps
        self.version = 0
        self.tag = "load"
        self.weight = 1.0  # its share of a contended link against instances (weight = units)

    def advance(self, t_s: float) -> None:
        self.remaining_bytes = max(0.0, self.remaining_bytes - (t_s - self.t_last) * self.alloc_gbps * GB)
        self.t_last = t_s

    def next_event_s(self) -> float:
        if self.alloc_gbps <= 0:
            return math.inf
        return self.t_last + self.remaining_bytes / (self.alloc_gbps * GB)


class Gpu:
    def __init__(self, gid: int, link_gbps: float, units: int):
        self.gid = gid
        self.link_gbps = link_gbps  # math.inf: no contention
        self.units = units
        self.instances: list[Instance] = []
        self.loads: list[LoadFlow] = []
        self.demand_gbps = 0.0

    @property
    def free_units(self) -> int:
        return self.units - sum(i.prof.units for i in self.instances)

    def streaming_demand_gbps(self) -> float:
        """Link demand of its instances and loads, as of the last re-share."""
        return self.demand_gbps


def water_fill(demands: list[float], capacity: float, weights: list[float] | None = None) -> list[float]:
    """Weighted max-min fair shares of `capacity` for flows wanting `demands`.

    Processor sharing of the link: a flow that wants less than its weighted share gets
    what it wants and the rest is split among the others by weight (weights = the SMs
    issuing reads, so a 2g instance pulls twice a 1g one when both saturate).
    """
    if capacity == math.inf or sum(demands) <= capacity:
        return list(demands)
    weights = weights or [1.0] * len(demands)
    order = sorted(range(len(demands)), key=lambda i: demands[i] / weights[i])
    shares = [0.0] * len(demands)
    left, weight_left = capacity, sum(weights)
    for index in order:
        share = min(demands[index], left * weights[index] / weight_left)
        shares[index] = share
        left -= share
        weight_left -= weights[index]
    return shares
