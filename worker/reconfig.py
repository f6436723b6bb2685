"""Online reconfiguration of a model's pipeline while its requests keep decoding.

`PipelineSwitch` changes a model from one pipeline (its stages and layer split) to
another without stopping the engine:
1. in the background: build the new stages (a remote stage maps the weights from the
   host store and makes its KV cache: no weight moves);
2. at a step boundary: the old pipeline starts recording the KV blocks each step writes,
   and the background copies the moved layers' KV of every block running sequences hold
   (a layer moves when its KV cache changes owner);
3. at a later step boundary: blocks written meanwhile are copied again (another
   background round while there are many, else now: the tail, the only pause), the
   engine switches to the new pipeline, and the old stages no longer used are retired.
Tokens are never lost, repeated or reordered: no step runs on a half-copied cache.
A failure while preparing abandons the switch (the old pipeline goes on).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import torch

from worker.model import KVCache
from worker.pipeline import PLACES, LocalStage, Pipeline, StageError, StageHost, StageSpec, wait
from worker.runner import zero_pages

logger = logging.getLogger(__name__)
COPY_CHUNK_BLOCKS = 256    # blocks per KV copy call
TAIL_MAX_BLOCKS = 64       # more written blocks than this: one more background round first
MAX_ROUNDS = 4


def build_pipeline(specs: list[StageSpec], slot, runner, client) -> Pipeline:
    """Stages for `specs` over a loaded ModelSlot (remote ones loaded on their servers)."""
    check_specs(specs, slot.config.num_layers)
    tag = uuid.uuid4().hex[:8]
    stages = [_stage(spec, i, tag, slot, runner, client) for i, spec in enumerate(specs)]
    try:
        for stage in stages:
            if spec_is_remote(stage.spec):
                stage.load(str(slot.model_dir), slot.num_blocks, runner.block_size,
                           str(runner.kv_dtype).removeprefix("torch."), runner.quantize or "")
    except Exception:
        Pipeline(stages, runner.block_size).close()
        raise
    return Pipeline(stages, runner.block_size)


def check_specs(specs: list[StageSpec], num_layers: int) -> None:
    """The specs cover layers [0, num_layers) in order, each stage at least one layer."""
    bounds = [0] + [s.end for s in specs]
    if not specs or [s.start for s in specs] != bounds[:-1] or bounds[-1] != num_layers or any(
            s.end <= s.start for s in specs):
        raise ValueError(f"stages {[(s.start, s.end) for s in specs]} do not split layers [0, {num_layers})")
    if any(s.place not in PLACES or (s.place == "remote") != bool(s.stage_id) for s in specs):
        raise ValueError(f"bad stage places in {specs}")


def spec_is_remote(spec: StageSpec) -> bool:
    return spec.place == "remote"


def _stage(spec: StageSpec, index: int, tag: str, slot, runner, client):
    if spec.place == "driver":
        return LocalStage(spec, StageHost(slot.model, slot.kv, spec.start, spec.end), "driver")
    if spec.place == "local":
        nbytes = 2 * slot.kv.k.numel() * slot.kv.k.element_size()
        kv = KVCache.allocate(slot.config, slot.num_blocks, runner.block_size, runner.kv_dtype,
                              buffer=zero_pages(nbytes))
        return LocalStage(spec, StageHost(slot.model, kv, spec.start, spec.end), f"local:{tag}:{index}")
    if client is None:
        raise ValueError("a remote stage needs the engine's NATS URL (Engine.reconfigure(nats_url=...))")
    from worker.stage_client import RemoteStage

    return RemoteStage(client, spec, f"{slot.model_id}-{tag}-{index}")


def moved_layers(old: Pipeline, new: Pipeline) -> list[tuple[object, object, int, int]]:
    """(old stage, new stage, start, end) for each run of layers whose KV changes owner."""
    jobs: list[tuple[object, object, int, int]] = []
    for layer in range(new.specs[-1].end):
        src, dst = old.stage_of(layer), new.stage_of(layer)
        if src.kv_key == dst.kv_key:
            continue
        if jobs and jobs[-1][0] is src and jobs[-1][1] is dst and jobs[-1][3] == layer:
            jobs[-1] = (src, dst, jobs[-1][2], layer + 1)
        else:
            jobs.append((src, dst, layer, layer + 1))
    return jobs


def copy_kv(jobs, block_ids: list[int], timeout_s: float) -> None:
    """Copy the jobs' layers of these blocks from old owner to new, a chunk at a time."""
    for src, dst, start, end in jobs:
        for i in range(0, len(block_ids), COPY_CHUNK_BLOCKS):
            chunk = block_ids[i:i + COPY_CHUNK_BLOCKS]
            k, v = wait(src.read_kv(start, end, chunk), timeout_s, "reading KV for a reconfiguration")
            wait(dst.write_kv(start, end, chunk, k, v), timeout_s, "writing KV for a reconfiguration")


class PipelineSwitch:
    """One model's change to a new pipeline; `advance()` at every step boundary."""

    def __init__(self, old: Pipeline, build: Callable[[], Pipeline], held_block_ids: Callable[[], list[int]],
                 timeout_s: float = 60.0):
        self.old, self.new = old, None
        self._held_block_ids = held_block_ids
        self.timeout_s = timeout_s
        self.num_rounds = 0
        self.tail_blocks = 0          # blocks copied at the switch
        self.pause_s = 0.0            # the switch's step boundary: the tail copy (steps wait)
        self.error: BaseException | None = None
        self._jobs: list = []
        self._busy = self._background(lambda: setattr(self, "new", build()))

    def _background(self, fn) -> threading.Event:
        done = threading.Event()

        def run() -> None:
            try:
                with torch.inference_mode():
                    fn()
            except Exception as exc:  # abandons the switch; advance() reports it
                logger.exception("pipeline reconfiguration failed")
                self.error = exc
            finally:
                done.set()

        threading.Thread(target=run, name="pipeline-switch", daemon=True).start()
        return done

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the background work under way (building, a copy round) is done: the
        next `advance()` then moves on (tests make a switch finish within a few steps so)."""
        return self._busy.wait(timeout_s)

    def advance(self) -> Pipeline | None:
        """At a step boundary: the pipeline to run from now on when the switch is done
        (the new one; the old one when it failed), else None (keep the old, switch later)."""
        if not self._busy.is_set():
            return None
        if self.error is not None:
            return self._abandon()
        if self.num_rounds == 0:
            self._jobs = moved_layers(self.old, self.new)
            return self._start_round(self._held_block_ids())
        written = sorted(self.old.written_blocks)
        if len(written) > TAIL_MAX_BLOCKS and self.num_rounds < MAX_ROUNDS:
            return self._start_round(written)
        start_s = time.perf_counter()
        try:
            with torch.inference_mode():
                copy_kv(self._jobs, written, self.timeout_s)
        except StageError as exc:
            logger.error("pipeline reconfiguration failed at the switch: %s", exc)
            self.error = exc
            return self._abandon()
        self.tail_blocks, self.pause_s = len(written), time.perf_counter() - start_s
        self.old.written_blocks = None
        self.old.close()
        return self.new

    def _abandon(self) -> Pipeline:
        self.old.written_blocks = None
        if self.new is not None:
            self.new.close()
        return self.old

    def _start_round(self, block_ids: list[int]) -> None:
        self.old.written_blocks = set()
        self.num_rounds += 1
        self._busy = self._background(lambda: copy_kv(self._jobs, block_ids, self.timeout_s))
        return None
