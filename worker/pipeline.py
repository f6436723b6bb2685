"""Pipeline-parallel serving of one model: contiguous layer ranges on several stages.

A stage computes layers [start, end) of the model and keeps the KV cache of those layers
only (indexed by absolute layer and by the engine's block ids: every stage holds the
same blocks, so a block table means the same thing everywhere). The first stage embeds,
the last one returns logits; between them the residual stream [T, H] fp32 travels.

A step's batch is cut into micro-batches of whole sequences so stages overlap: while
stage 1 runs micro-batch 0, stage 0 runs micro-batch 1 (how many:
`placer.pipeline_policy.num_micro_batches`). Each stage runs its calls one at
a time, in order: a `LocalStage` on a thread of this process, a `RemoteStage`
(worker/stage_client.py) in a stage server over NATS.

Stage places (`StageSpec.place`):
- "driver": in the engine's process over the engine's own KV cache (no copy to move in);
- "local": in the engine's process with a KV cache of its own (a slice in shared memory);
- "remote": a stage server (`python -m worker.stage_server`) named by `stage_id`.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from dataclasses import dataclass

import torch

from placer.pipeline_policy import num_micro_batches, split_layers
from worker.forward_batch import ForwardBatch
from worker.model import CausalLM, KVCache

logger = logging.getLogger(__name__)
PLACES = ("driver", "local", "remote")


class StageError(RuntimeError):
    """A stage failed or is gone: the step's KV on the stages is lost (the engine recomputes)."""


@dataclass(frozen=True)
class StageSpec:
    start: int
    end: int
    place: str = "driver"
    stage_id: str = ""      # "remote": the stage server's id


def specs_for(num_layers: int, speeds: list[float], places: list[tuple[str, str]]) -> list[StageSpec]:
    """StageSpecs for (place, stage_id) per stage, layers split by `split_layers`."""
    ranges = split_layers(num_layers, speeds)
    return [StageSpec(a, b, place, stage_id) for (a, b), (place, stage_id) in zip(ranges, places, strict=True)]


def micro_batches(batch: ForwardBatch, n: int) -> list[ForwardBatch]:
    """The batch cut into at most n runs of whole sequences with about equal token counts."""
    num_seqs = len(batch.query_lens)
    n = max(1, min(n, num_seqs))
    if n == 1:
        return [batch]
    total, cuts, acc = batch.num_tokens, [0], 0
    for i, q_len in enumerate(batch.query_lens[:-1]):
        acc += q_len
        if len(cuts) < n and acc >= total * len(cuts) / n and num_seqs - (i + 1) >= n - len(cuts):
            cuts.append(i + 1)
    cuts.append(num_seqs)
    return [slice_batch(batch, a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def slice_batch(batch: ForwardBatch, first: int, last: int) -> ForwardBatch:
    """Sequences [first, last) of the batch (their logits rows renumbered)."""
    t0 = sum(batch.query_lens[:first])
    t1 = t0 + sum(batch.query_lens[first:last])
    rows = batch.logits_indices
    rows = rows[(rows >= t0) & (rows < t1)] - t0
    return ForwardBatch(batch.input_ids[t0:t1], batch.positions[t0:t1], batch.query_lens[first:last],
                        batch.context_lens[first:last], batch.block_tables[first:last],
                        batch.slot_mapping[t0:t1], rows)


class StageHost:
    """Layers [start, end) of a model over a KV cache that holds (at least) those layers."""

    def __init__(self, model: CausalLM, kv: KVCache, start: int, end: int):
        self.model, self.kv, self.start, self.end = model, kv, start, end

    def forward(self, batch: ForwardBatch, x: torch.Tensor | None) -> torch.Tensor:
        return self.model.forward_layers(batch, self.kv, self.start, self.end, x)

    def read_kv(self, start: int, end: int, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of layers [start, end), blocks `block_ids`: [layers, blocks, bs, nKV, D]."""
        index = torch.tensor(block_ids, dtype=torch.int64)
        return (self.kv.k[start:end].index_select(1, index).contiguous(),
                self.kv.v[start:end].index_select(1, index).contiguous())

    def write_kv(self, start: int, end: int, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        index = torch.tensor(block_ids, dtype=torch.int64)
        self.kv.k[start:end].index_copy_(1, index, k.to(self.kv.k.dtype))
        self.kv.v[start:end].index_copy_(1, index, v.to(self.kv.v.dtype))


class LocalStage:
    """A stage in this process: its calls run one at a time on a thread of its own."""

    def __init__(self, spec: StageSpec, host: StageHost, kv_key: str):
        self.spec, self.host, self.kv_key = spec, host, kv_key
        self._thread = cf.ThreadPoolExecutor(1, thread_name_prefix=f"stage{spec.start}-{spec.end}")

    def forward(self, batch: ForwardBatch, x: torch.Tensor | None) -> cf.Future:
        return self._thread.submit(self._forward, batch, x)

    def _forward(self, batch, x):
        with torch.inference_mode():
            return self.host.forward(batch, x)

    def read_kv(self, start: int, end: int, block_ids: list[int]) -> cf.Future:
        return _done(self.host.read_kv, start, end, block_ids)

    def write_kv(self, start: int, end: int, block_ids: list[int], k, v) -> cf.Future:
        return _done(self.host.write_kv, start, end, block_ids, k, v)

    def close(self) -> None:
        self._thread.shutdown(wait=False)


def _done(fn, *args) -> cf.Future:
    """fn(*args) run now, as a settled future (the same shape as a remote call's)."""
    future: cf.Future = cf.Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # handed to whoever waits on the future
        future.set_exception(exc)
    return future


class Pipeline:
    """forward(batch) -> [S, vocab] logits through the stages, micro-batched.

    While `written_blocks` is a set, every KV block a step writes is added to it (an
    online reconfiguration copies those again at the switch)."""

    def __init__(self, stages: list, block_size: int, timeout_s: float = 60.0):
        self.stages = stages
        self.block_size = block_size
        self.timeout_s = timeout_s
        self.written_blocks: set[int] | None = None

    @property
    def specs(self) -> list[StageSpec]:
        return [s.spec for s in self.stages]

    def stage_of(self, layer: int):
        return next(s for s in self.stages if s.spec.start <= layer < s.spec.end)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self.written_blocks is not None:
            self.written_blocks.update((batch.slot_mapping // self.block_size).tolist())
        if len(self.stages) == 1 and isinstance(self.stages[0], LocalStage):
            return self.stages[0].host.forward(batch, None)
        parts = [self._through_stages(mb) for mb in micro_batches(batch, num_micro_batches(len(self.stages), batch.num_tokens > len(batch.query_lens)))]
        return torch.cat([wait(f, self.timeout_s, "a pipeline step") for f in parts])

    def _through_stages(self, batch: ForwardBatch) -> cf.Future:
        """A future of the last stage's output for one micro-batch, chained stage to stage."""
        done: cf.Future = cf.Future()

        def run(i: int, x) -> None:
            try:
                step = self.stages[i].forward(batch, x)
            except Exception as exc:  # a stage that cannot even take the call
                done.set_exception(exc)
                return
            step.add_done_callback(lambda f: after(i, f))

        def after(i: int, f: cf.Future) -> None:
            if f.exception() is not None:
                done.set_exception(f.exception())
            elif i + 1 == len(self.stages):
                done.set_result(f.result())
            else:
                run(i + 1, f.result())

        run(0, None)
        return done

    def close(self) -> None:
        """Retire the stages (a remote one is unloaded on its server)."""
        for stage in self.stages:
            stage.close()


def wait(future: cf.Future, timeout_s: float, what: str):
    """future.result(); StageError when it failed or took longer than timeout_s."""
    try:
        return future.result(timeout=timeout_s)
    except cf.TimeoutError:
        raise StageError(f"{what} took more than {timeout_s:.0f} s") from None
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
