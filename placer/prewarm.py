"""Forecast-driven prewarming, live: the placer's I/O around `policy.plan_prewarm`.

Every submit feeds the per-model `DemandForecaster`; every `prewarm_interval_s` the plan
is recomputed from the placer's slice view and the catalog's model sizes, and each
change goes to its worker as a `ResidencyCommand` on `c2c.worker.<id>.residency`
(PREWARM with the target fraction ρ, or EVICT when ρ = 0). Decisions stay in the policy;
this module only gathers inputs and publishes. Redis or NATS errors skip one round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from placer.policy import DemandForecaster, PrewarmAction, plan_prewarm
from services import catalog, natsutil, schemas, subjects
from services.schemas import ResidencyAction, ResidencyCommand, WorkerState

log = logging.getLogger(__name__)


class Prewarmer:
    def __init__(self, nc, redis, budget_bytes: int, forecaster: DemandForecaster | None = None):
        self.nc, self.redis = nc, redis
        self.budget_bytes = budget_bytes  # per slice, scaled by its idle KV fraction
        self.forecaster = forecaster or DemandForecaster()

    def observe(self, model_id: str) -> None:
        self.forecaster.observe(model_id, time.time())

    async def run(self, interval_s: float, slices: Callable[[], list[WorkerState]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.plan_once(slices())
            except natsutil.IO_ERRORS as exc:
                log.warning("prewarm round skipped: %s", exc)

    async def plan_once(self, slices: list[WorkerState]) -> list[PrewarmAction]:
        """One planning round; returns the actions it published."""
        if not slices:
            return []
        model_bytes = {m: e.nbytes for m, e in (await catalog.load_all(self.redis)).items()}
        # prewarmed tiles live in idle KV space and yield it back when KV needs it
        budgets = {s.worker_id: int(s.kv_free_frac * self.budget_bytes) for s in slices}
        actions = plan_prewarm(self.forecaster, slices, model_bytes, time.time(), budgets)
        for action in actions:
            verb = ResidencyAction.PREWARM if action.rho > 0 else ResidencyAction.EVICT
            command = ResidencyCommand(action.worker_id, verb, action.model_id, fraction=action.rho)
            await self.nc.publish(subjects.worker_residency(action.worker_id), schemas.encode(command))
            log.info("prewarm plan: %s %s on %s (rho %.2f)", verb.name.lower(), action.model_id,
                     action.worker_id, action.rho)
        return actions
