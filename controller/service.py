"""`c2cserve controller`: the feedback loop per worker, from telemetry to knobs.

Subscribes `c2c.telemetry.*` (one controller per cluster: the law keeps per-worker
state, so every sample of a worker must reach the same controller). For each worker one
`controller.policy.WorkerController` folds the sample in; a change is published as a
`ControlUpdate` on `c2c.control.<id>` and the last one is kept in Redis
(`c2c:control:<id>`), off the critical path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from nats.aio.msg import Msg

from controller.policy import SLO, Knobs, WorkerController
from services import keys, natsutil, schemas, subjects
from services.config import ControllerConfig, add_config_arguments, load_config
from services.schemas import ControlUpdate, WorkerState

log = logging.getLogger(__name__)


def update_of(worker_id: str, knobs: Knobs) -> ControlUpdate:
    return ControlUpdate(
        worker_id=worker_id, chunk_size=knobs.chunk_size, max_num_seqs=knobs.max_num_seqs,
        max_num_batched_tokens=knobs.max_num_batched_tokens,
        decode_threshold=knobs.decode_threshold, rho_cap=knobs.rho_cap, t_s=time.time(),
    )


class Controller:
    def __init__(self, config: ControllerConfig):
        self.config = config
        self.slo = SLO(ttft_ms=config.ttft_slo_ms, tpot_ms=config.tpot_slo_ms)
        self.controllers: dict[str, WorkerController] = {}
        self.nc = None
        self.redis = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        c = self.config
        self.nc = await natsutil.connect_nats(c.nats_url, "controller", c.connect_timeout_s)
        self.redis = await natsutil.connect_redis(c.redis_url, c.connect_timeout_s)
        await natsutil.subscribe_typed(self.nc, subjects.TELEMETRY_ALL, WorkerState, self.on_telemetry)
        await self.nc.flush()
        log.info("controller ready (SLO ttft=%.0f ms tpot=%.0f ms)", self.slo.ttft_ms, self.slo.tpot_ms)

    async def stop(self) -> None:
        await natsutil.shutdown(self._tasks, self.nc, self.redis)

    async def on_telemetry(self, t: WorkerState, msg: Msg) -> None:
        """c2c.telemetry.<id> (WorkerState) -> maybe c2c.control.<id> (ControlUpdate)."""
        controller = self.controllers.get(t.worker_id)
        if controller is None:
            controller = self.controllers[t.worker_id] = WorkerController(self.slo, Knobs(max_num_seqs=t.max_num_seqs))
        knobs = controller.update(t)  # the worker's own record (its clock paces the law)
        if knobs is None:
            return
        update = update_of(t.worker_id, knobs)
        await self.nc.publish(subjects.control(t.worker_id), schemas.encode(update))
        log.info("worker %s: %s", t.worker_id, update.knobs())
        natsutil.spawn(self._remember(update), self._tasks, "store control update")

    async def _remember(self, update: ControlUpdate) -> None:
        row = {k: str(v) for k, v in schemas.to_json_dict(update).items()}
        await self.redis.hset(keys.control(update.worker_id), mapping=row)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ControllerConfig)


def run(args: argparse.Namespace) -> int:
    natsutil.run(natsutil.serve_until_signal(Controller(load_config(ControllerConfig, args))))
    return 0
