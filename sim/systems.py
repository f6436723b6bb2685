"""The systems compared by the simulator, each a set of decisions on the same engine.

- `C2CServe`: weights stream from host memory; any instance serves any model at once;
  hot tiles are cached at rho (on first use, and ahead of demand by the placer's
  prewarm plan); routing, prewarming and knobs come from the live policy modules
  (`placer.policy`, `controller.policy`).
- `ServerlessLLM`: an instance holds one model, loaded whole into its memory over the
  link on a cold start (keep-alive until its units are needed, then LRU).
- `Dedicated`: instances pinned to models for the whole run, provisioned by popularity.
- `TimeShare`: whole GPUs, several models resident in HBM (LRU by bytes), loaded on a
  miss; the GPU's steps cycle over its resident models.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import replace

from controller.policy import SLO, Knobs, WorkerController
from placer.plan import choose_plan
from placer.policy import (
    DemandForecaster,
    PrewarmAction,
    RequestView,
    choose_slice,
    plan_prewarm,
)
from services.schemas import WorkerState
from sim.cluster import Instance, Request
from sim.cost_model import (
    C2C_EFFICIENCY,
    C2C_GBPS,
    PROFILE_ORDER,
    PROFILES,
    fair_link_gbps,
    max_rho,
    prefill_profile,
    smallest_fitting_profile,
    step_time,
    streaming_profile,
)
from sim.planning import plan_for, plan_profiles

QUEUE_FACTOR = 2  # loading systems: queue on an instance up to this many batches
NEW_SLICE_MARGIN_S = 0.02  # a new slice must beat the best existing one by this much TTFT
BESIDE_MARGIN = 0.25  # a model joins a busy slice only if the cycle stays within this x its TPOT SLO
FILL_WEIGHT = 1.0  # a progressive fill's link share, per unit of its slice, against the slice's streaming
FILL_PIECES = 8  # progressive caching copies a model's tiles in this many steps (rho rises per piece)


class System:
    name = "system"
    timer_period_s: float | None = None
    control_period_s: float | None = None  # wake a prefilling instance this often (its controller)

    def setup(self, sim) -> None: ...
    def route(self, sim, req: Request): ...
    def on_assign(self, sim, inst: Instance, req: Request) -> bool:
        return False
    def rho_of(self, inst: Instance, model: int) -> float:
        return 1.0
    def on_prefill_done(self, sim, inst: Instance, req: Request) -> None: ...
    def on_finish(self, sim, inst: Instance, req: Request) -> None: ...
    def on_event(self, sim, inst: Instance) -> None: ...
    def on_timer(self, sim, t_s: float) -> None: ...
    def on_load_done(self, sim, flow) -> None: ...
    def on_create(self, sim, inst: Instance) -> None: ...
    def on_destroy(self, sim, inst: Instance) -> None: ...


# ==================================================================== c2cserve


class C2CServe(System):
    name = "c2cserve"
    control_period_s = 1.0

    def __init__(self, seed: int = 0, prewarm: bool = True, control: bool = True, num_sampled: int = 4,
                 max_models_per_instance: int = 4, prewarm_period_s: float = 15.0, plans: bool = True,
                 fill_gbps: float = C2C_GBPS * C2C_EFFICIENCY):
        self.rng = random.Random(seed)
        self.plans = plans  # choose among stream / progressive / new slice by predicted TTFT
        self.fill_gbps = fill_gbps  # the copy engines' rate for progressive caching (memcpy)
        self.prewarm, self.control = prewarm, control
        self.num_sampled, self.max_models = num_sampled, max_models_per_instance
        self.timer_period_s = prewarm_period_s if prewarm else None
        self.control_period_s = 1.0 if control else None
        self.forecaster = DemandForecaster(tau_s=60.0, bin_s=10.0, num_bins=360)
        self.by_profile: dict[str, list[Instance]] = {name: [] for name in PROFILES}
        self.model_instances: dict[int, set[Instance]] = {}
        self._profile_memo: dict[tuple[int, int], str] = {}
        self._model_memo: dict[tuple[int, str], tuple[float, float]] = {}

    def setup(self, sim) -> None:
        self.specs = sim.specs
        self.profile_of = [streaming_profile(s, sim.catalog.tpot_slo_s[i]) for i, s in enumerate(sim.specs)]
        self._whole_profile = [smallest_fitting_profile(s) for s in sim.specs]
        self.model_bytes = {str(m): int(s.weight_bytes) for m, s in enumerate(sim.specs) if self.profile_of[m] == "1g.12gb"}
        self.slo = SLO(ttft_ms=1000 * sim.catalog.slo.ttft_floor_s, tpot_ms=1000 * sim.catalog.slo.tpot_floor_s)
        for gpu in sim.gpus:
            for _ in range(min(sim.initial_slices, gpu.free_units)):
                sim.create_instance(gpu, "1g.12gb")

    def on_create(self, sim, inst: Instance) -> None:
        self.by_profile[inst.prof.name].append(inst)
        inst.ctl = WorkerController(self.slo, Knobs(chunk_size=inst.chunk, max_num_seqs=inst.max_seqs,
                                                     max_num_batched_tokens=inst.chunk + inst.max_seqs))
        inst.ctl_last_s = -math.inf
        inst.rho_cap = 1.0

    def on_destroy(self, sim, inst: Instance) -> None:
        self.by_profile[inst.prof.name].remove(inst)
        for model in list(inst.cached_bytes) + list(inst.ready):
            self.model_instances.get(model, set()).discard(inst)

    # ---- routing
    def route(self, sim, req: Request):
        """The plan with the best predicted TTFT (`placer.plan.choose_plan`) among: the
        best existing slice by the placer's score (streaming, and filling its cache in
        the background), and a new slice of the request's profile or one big enough to
        hold the whole model (the loading baselines' choice). Without a plan, the best
        slice ignoring the TTFT backlog rule; None only when nothing can take it."""
        if req.num_tries == 0:
            self.forecaster.observe(str(req.model), sim.now)
        spec = self.specs[req.model]
        profile = self._request_profile(req)
        prof = PROFILES[profile]
        rho, tokens_per_s = self._model_on(req.model, profile)
        candidates = self._candidates(req, profile)
        views = [self._view(sim, inst, str(k), tokens_per_s, req.model) for k, inst in enumerate(candidates)]
        est_step_s = step_time(spec, prof, 1, req.prompt, rho, fair_link_gbps(prof))
        view = RequestView(str(req.rid), str(req.model), req.prompt, est_step_ms=1000 * est_step_s,
                           tpot_slo_ms=1000 * req.tpot_slo, ttft_slo_ms=1000 * req.ttft_slo)
        worker_id = choose_slice(view, views)
        chosen = candidates[int(worker_id)] if worker_id is not None else None
        is_full = chosen is not None and chosen.num_queued >= chosen.max_seqs
        picked = self._plan(sim, req, None if is_full else chosen, profile, tokens_per_s)
        if picked is not None:
            return picked
        if chosen is None:
            worker_id = choose_slice(replace(view, ttft_slo_ms=0.0), views)
            chosen = candidates[int(worker_id)] if worker_id is not None else None
        return chosen

    def _plan(self, sim, req: Request, chosen: Instance | None, profile: str, tokens_per_s: float) -> Instance | None:
        """The existing slice, or a new one, whichever `choose_plan` predicts faster."""
        if not self.plans:  # ablation: a new slice of the request's profile only when none fits
            if chosen is None:
                gpu = sim.find_room(PROFILES[profile].units, gpu_key=lambda g: g.streaming_demand_gbps())
                return sim.create_instance(gpu, profile) if gpu is not None else None
            return chosen
        spec = self.specs[req.model]
        plans, rooms = [], {}
        if chosen is not None:
            if self._is_warm(chosen, req.model):
                return chosen  # warm: nothing to gain from a new slice
            wait_s = chosen.queued_prompt_tokens / max(1e-9, tokens_per_s)
            plans.append(plan_for(spec, req.prompt, chosen.prof, chosen.gpu, chosen.cached_bytes.get(req.model, 0.0),
                                  self._cache_room(sim, chosen), wait_s, self.fill_gbps, chosen.chunk, "0",
                                  chosen.demand_gbps))
        for name in self._new_profiles(req, profile):
            room = sim.pick_room(PROFILES[name].units, gpu_key=lambda g: g.streaming_demand_gbps())
            if room is None:
                continue
            new = PROFILES[name]
            plan = plan_for(spec, req.prompt, new, room[0], 0.0, new.usable_bytes, 0.0, self.fill_gbps, sim.chunk, None)
            rooms[len(plans)] = name
            plans.append(plan)
        best = choose_plan(plans, req.tpot_slo, NEW_SLICE_MARGIN_S)
        if best is None:
            return None
        if not best.is_new_slice:
            return chosen
        name = rooms[plans.index(best)]
        gpu = sim.find_room(PROFILES[name].units, gpu_key=lambda g: g.streaming_demand_gbps())
        return sim.create_instance(gpu, name) if gpu is not None else chosen

    def _new_profiles(self, req: Request, profile: str) -> list[str]:
        """The request's own profile and every bigger one up to the smallest that holds
        the whole model (the loading baselines' choice)."""
        return plan_profiles(profile, self._whole_profile[req.model])

    def _is_warm(self, inst: Instance, model: int) -> bool:
        """The model's tiles are (nearly) all the slice can hold, or being filled."""
        if model in inst.active_models():
            return True
        want = max_rho(self.specs[model], inst.prof) * self.specs[model].weight_bytes
        return inst.cached_bytes.get(model, 0.0) >= 0.9 * want

    def _request_profile(self, req: Request) -> str:
        key = (req.model, req.prompt)
        profile = self._profile_memo.get(key)
        if profile is None:
            spec = self.specs[req.model]
            profile = prefill_profile(spec, req.prompt, req.ttft_slo, self.profile_of[req.model])
            self._profile_memo[key] = profile
        return profile

    def _model_on(self, model: int, profile: str) -> tuple[float, float]:
        """(largest rho, prefill tokens/s at the fair link share) of a model on a profile."""
        key = (model, profile)
        if key not in self._model_memo:
            spec, prof = self.specs[model], PROFILES[profile]
            rho = max_rho(spec, prof)
            per_token_s = step_time(spec, prof, 1024, 0, rho, fair_link_gbps(prof)) / 1024
            self._model_memo[key] = (rho, 1.0 / max(1e-9, per_token_s))
        return self._model_memo[key]

    def _candidates(self, req: Request, profile: str) -> list[Instance]:
        """Slices already holding the model, plus a few sampled ones it fits beside; any
        slice at least as big as `profile` qualifies (a bigger slice serves it faster)."""
        units = PROFILES[profile].units
        same = [i for i in self.model_instances.get(req.model, ()) if i.prof.units >= units]
        if len(same) > 6:  # a popular model: its least loaded holders
            same = heapq.nsmallest(6, same, key=lambda i: (i.num_queued, i.iid))
        sampled = []
        for name in PROFILE_ORDER[PROFILE_ORDER.index(profile):]:  # its size, then one of each bigger
            pool = self.by_profile[name]
            num = self.num_sampled if name == profile else 1
            sampled += self.rng.sample(pool, min(num, len(pool)))
        seen, out = set(), []
        for inst in same + sampled:
            if inst.iid in seen:
                continue
            seen.add(inst.iid)
            if req.model in inst.ready or self._fits_beside(inst, req):
                out.append(inst)
        return out

    def _fits_beside(self, inst: Instance, req: Request) -> bool:
        """Room for one more model: its step (at the rho the slice can still cache) added to
        the slice's cycle stays within the TPOT SLO."""
        active = inst.active_models()
        if len(active) >= self.max_models:
            return False
        if not active:
            return True
        spec, prof = self.specs[req.model], inst.prof
        taken = sum(inst.cached_bytes.get(m, 0.0) for m in active) + inst.kv_used_bytes(self.specs)
        rho = min(self._model_on(req.model, prof.name)[0], max(0.0, prof.usable_bytes - taken) / spec.weight_bytes)
        est_s = step_time(spec, prof, 1, req.prompt, rho, fair_link_gbps(prof))
        cycle_s = inst.cycle_s if inst.cycle_s < math.inf else inst.t0_s
        return cycle_s + est_s <= BESIDE_MARGIN * req.tpot_slo

    def _view(self, sim, inst: Instance, worker_id: str, prefill_tokens_per_s: float = 0.0,
              model: int | None = None) -> WorkerState:
        """The placer's view of a slice; for routing `model`, only that model's entries
        (the only ones the score reads), which keeps a view cheap to build."""
        gpu = inst.gpu
        if model is not None:
            models = frozenset((str(model),)) if model in inst.model_refs else frozenset()
            cached = inst.cached_bytes.get(model)
            cached_fraction = {str(model): cached / sim.specs[model].weight_bytes} if cached else {}
        else:
            models = frozenset(map(str, inst.model_refs))
            cached_fraction = {str(m): b / sim.specs[m].weight_bytes for m, b in inst.cached_bytes.items()}
        link_util = 0.0 if gpu.link_gbps == math.inf else min(2.0, gpu.streaming_demand_gbps() / gpu.link_gbps)
        kv_used = inst.kv_used_bytes(sim.specs)
        return WorkerState(
            worker_id=worker_id,
            node=str(gpu.gid), gpu=str(gpu.gid), backend="cuda",
            models=models, active_models=frozenset(map(str, inst.model_refs)), cached_fraction=cached_fraction,
            num_running=len(inst.decode), num_waiting=inst.num_queued - len(inst.decode),
            max_num_seqs=inst.max_seqs, kv_free_frac=1.0 - kv_used / inst.prof.usable_bytes,
            link_util=link_util, cycle_ms=1000 * inst.cycle_s if inst.cycle_s < math.inf else 0.0,
            queued_prefill_tokens=inst.queued_prompt_tokens, prefill_tokens_per_s=prefill_tokens_per_s)

    # ---- serving
    def on_assign(self, sim, inst: Instance, req: Request) -> bool:
        is_cold = req.model not in inst.cached_bytes and req.model not in inst.active_models()
        inst.ready.add(req.model)  # streaming: usable at once, nothing to load
        self.model_instances.setdefault(req.model, set()).add(inst)
        if self.plans:
            self._fill(sim, inst, req.model)
        return is_cold

    def _fill(self, sim, inst: Instance, model: int) -> None:
        """Progressive caching: copy the model's tiles into the slice in the background, a
        piece at a time (each piece raises rho for the steps that follow), up to what the
        slice can hold next to its KV."""
        spec = self.specs[model]
        want = min(max_rho(spec, inst.prof) * spec.weight_bytes,
                   inst.cached_bytes.get(model, 0.0) + self._cache_room(sim, inst))
        missing = want - inst.cached_bytes.get(model, 0.0)
        if missing <= 0.01 * spec.weight_bytes:
            return
        if _is_loading(inst, model):
            return  # a fill or prewarm of it is under way
        piece = max(missing / FILL_PIECES, spec.weight_bytes / (4 * FILL_PIECES))
        sim.start_load(inst, model, min(piece, missing), self.fill_gbps, tag="fill", weight=FILL_WEIGHT * inst.prof.units)

    def rho_of(self, inst: Instance, model: int) -> float:
        cached = inst.cached_bytes.get(model, 0.0)
        return min(inst.rho_cap, cached / self.specs[model].weight_bytes) if cached else 0.0

    def on_prefill_done(self, sim, inst: Instance, req: Request) -> None:
        """The first pass over a model leaves its hot tiles in HBM (copied as they stream);
        tiles of models the slice no longer runs make way (oldest first)."""
        spec = sim.specs[req.model]
        want = max_rho(spec, inst.prof) * spec.weight_bytes
        have = inst.cached_bytes.pop(req.model, 0.0)  # re-inserted last: most recent
        inst.cached_bytes[req.model] = have
        if have >= want:
            return
        active = inst.active_models()
        for model in [m for m in inst.cached_bytes if m not in active]:
            if self._cache_room(sim, inst) >= want - have:
                break
            del inst.cached_bytes[model]
            if model not in inst.ready:
                self.model_instances.get(model, set()).discard(inst)
        inst.cached_bytes[req.model] = have + min(want - have, self._cache_room(sim, inst))
        self._fit_cache(sim, inst)

    def _fill_landed(self, sim, inst: Instance, model: int, rho_old: float) -> None:
        """The fill copies the model from its end backwards while the prefill streams it
        from the start, so the two move disjoint bytes. The fluid model spreads a new rho
        over the whole pass; this moves the running pass's progress so that the bytes it
        still streams are the ones neither has moved yet."""
        head = inst.prefill_head
        rho_new = self.rho_of(inst, model)
        if head is None or head.model != model or set(inst.model_decode) - {model} or rho_new >= 1.0:
            return
        inst.advance(sim.now)
        remaining = inst.prefill_target - inst.v
        whole = math.floor(max(0.0, remaining - 1e-9))
        pass_left = remaining - whole
        moved = rho_new - rho_old
        left = max(0.0, ((1.0 - rho_old) * pass_left - moved) / (1.0 - rho_new))
        inst.prefill_target = inst.v + whole + min(pass_left, left)

    def _cache_room(self, sim, inst: Instance) -> float:
        used = inst.kv_used_bytes(sim.specs) + sum(inst.cached_bytes.values())
        return max(0.0, inst.prof.usable_bytes - used)

    def _fit_cache(self, sim, inst: Instance) -> None:
        """KV has priority: drop tiles of idle models first, then of active ones."""
        over = -self._cache_room(sim, inst)
        if over <= 0:
            return
        active = inst.active_models()
        for model in sorted(inst.cached_bytes, key=lambda m: m in active):
            take = min(over, inst.cached_bytes[model])
            inst.cached_bytes[model] -= take
            over -= take
            if inst.cached_bytes[model] <= 0:
                del inst.cached_bytes[model]
            if over <= 0:
                return

    def on_finish(self, sim, inst: Instance, req: Request) -> None:
        if req.model not in inst.active_models():
            inst.ready.discard(req.model)
            if req.model not in inst.cached_bytes:
                self.model_instances.get(req.model, set()).discard(inst)

    # ---- control: the live controller's law, per instance, at most once a second
    def on_event(self, sim, inst: Instance) -> None:
        if not self.control or sim.now - inst.ctl_last_s < 1.0:
            return
        inst.ctl_last_s = sim.now
        kv_used = inst.kv_used_bytes(sim.specs)
        sample = WorkerState(
            worker_id=str(inst.iid), t_s=sim.now, ttft_p50_ms=inst.ttft_ewma_ms,
            tpot_p50_ms=1000 * inst.cycle_s if inst.decode and inst.cycle_s < math.inf else None,
            num_waiting=inst.num_queued - len(inst.decode), num_running=len(inst.decode),
            link_gbps=inst.host_bytes / 1e9 / inst.cycle_s if inst.cycle_s < math.inf else 0.0,
            link_capacity_gbps=inst.alloc_gbps, kv_free_frac=1.0 - kv_used / inst.prof.usable_bytes,
            oldest_wait_ms=self._oldest_wait_ms(sim, inst))
        knobs = inst.ctl.update(sample)
        if knobs is not None:
            self._apply_knobs(inst, knobs)

    def _oldest_wait_ms(self, sim, inst: Instance) -> float | None:
        waiting = [r.t_arrival for r in inst.queue] + [r.t_arrival for _, _, r in inst.prefill]
        if inst.prefill_head is not None:
            waiting.append(inst.prefill_head.t_arrival)
        return 1000.0 * (sim.now - min(waiting)) if waiting else None

    def _apply_knobs(self, inst: Instance, knobs: Knobs) -> None:
        if knobs.chunk_size != inst.chunk and inst.prefill_head is not None and inst.head_chunk == inst.chunk:
            left_tokens = max(0.0, inst.prefill_target - inst.v) * inst.chunk
            inst.prefill_target = inst.v + max(left_tokens / knobs.chunk_size, 0.0)
            inst.head_chunk = knobs.chunk_size
        inst.chunk, inst.max_seqs, inst.rho_cap = knobs.chunk_size, knobs.max_num_seqs, knobs.rho_cap

    # ---- prewarm: the live placer's forecaster and plan
    def on_timer(self, sim, t_s: float) -> None:
        pool = self._prewarm_pool(sim, t_s)
        views = [self._view(sim, inst, str(k)) for k, inst in enumerate(pool)]
        budgets = {str(k): int(self._cache_room(sim, inst)) for k, inst in enumerate(pool)}
        actions = plan_prewarm(self.forecaster, views, self.model_bytes, t_s, budgets)
        for action in actions:
            self._prewarm(sim, pool[int(action.worker_id)], action)

    def _prewarm_pool(self, sim, t_s: float, num_sampled: int = 128) -> list[Instance]:
        """Slices the plan considers: those holding a busy model, plus a random sample."""
        pool = self.by_profile["1g.12gb"]
        chosen = {inst.iid: inst for inst in self.rng.sample(pool, min(num_sampled, len(pool)))}
        for model_id in self.forecaster.models():
            if model_id in self.model_bytes and self.forecaster.rate(model_id, t_s) >= 0.02:
                for inst in self.model_instances.get(int(model_id), ()):
                    if inst.prof.name == "1g.12gb":
                        chosen[inst.iid] = inst
        return sorted(chosen.values(), key=lambda i: i.iid)

    def _prewarm(self, sim, inst: Instance, action: PrewarmAction) -> None:
        model = int(action.model_id)
        have = inst.cached_bytes.get(model, 0.0)
        want = action.rho * sim.specs[model].weight_bytes
        if want <= have:
            if want < have and model not in inst.active_models():
                inst.cached_bytes[model] = want
                if want <= 0:
                    del inst.cached_bytes[model]
            return
        if _is_loading(inst, model):
            return
        sim.start_load(inst, model, want - have, inst.prof.link_cap_gbps, tag="prewarm")

    def on_load_done(self, sim, flow) -> None:
        inst, model = flow.instance, flow.model
        if not inst.alive:
            return
        want = max_rho(self.specs[model], inst.prof) * self.specs[model].weight_bytes
        rho_old = self.rho_of(inst, model)
        inst.cached_bytes[model] = min(want, inst.cached_bytes.get(model, 0.0) + flow.nbytes)
        if flow.tag == "fill":
            self._fill_landed(sim, inst, model, rho_old)
        self.model_instances.setdefault(model, set()).add(inst)
        self._fit_cache(sim, inst)
        if flow.tag == "fill" and model in inst.active_models():
            self._fill(sim, inst, model)


def _is_loading(inst: Instance, model: int) -> bool:
    """A fill or a prewarm copy of `model` into `inst` is under way."""
    return any(f.model == model for f in inst.gpu.loads if f.instance is inst)
