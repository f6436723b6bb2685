"""Pipeline stage calls (worker/stage_client.py -> worker/stage_server.py) on the wire.

A call or a reply is one frame: a msgpack header (`StageCall` / `StageReply`) naming the
tensors that follow it as raw bytes (worker/stage_frames.py). A frame larger than the
NATS max payload travels in parts, numbered in the `PART_HEADER` / `PARTS_HEADER` NATS
headers and put back together by the receiver in order.
"""

from __future__ import annotations

import msgspec

PART_HEADER = "C2C-Part"
PARTS_HEADER = "C2C-Parts"


class TensorInfo(msgspec.Struct, array_like=True):
    name: str
    dtype: str        # torch dtype name without "torch.", e.g. "float32"
    shape: list[int]


class StageCall(msgspec.Struct, omit_defaults=True):
    op: str                                  # load | forward | read_kv | write_kv | unload | ping
    slot_id: str = ""                        # a model's layer range on this server (load .. unload)
    model_dir: str = ""                      # load: the checkpoint (mapped from the host store)
    start: int = 0                           # load: layers [start, end); read_kv/write_kv: layers
    end: int = 0
    num_blocks: int = 0                      # load: the engine's KV blocks (same ids everywhere)
    block_size: int = 0
    kv_dtype: str = "float32"
    quantize: str = ""
    query_lens: list[int] = []               # forward: the ForwardBatch's lists
    context_lens: list[int] = []
    block_tables: list[list[int]] = []
    block_ids: list[int] = []                # read_kv / write_kv
    tensors: list[TensorInfo] = []


class StageReply(msgspec.Struct, omit_defaults=True):
    error: str = ""                          # non-empty: the call failed (the stage lives on)
    tensors: list[TensorInfo] = []


class StageWire(msgspec.Struct, array_like=True):
    """One stage of a pipeline (worker.pipeline.StageSpec on the wire)."""

    start: int
    end: int
    place: str = "driver"        # "driver" | "local" | "remote"
    stage_id: str = ""


class PipelineCommand(msgspec.Struct, omit_defaults=True):
    """placer -> worker (`c2c.worker.<id>.pipeline`): from a later step on, serve `model_id`
    as these stages (online: worker/reconfig.py); one stage [0, num_layers) = whole again."""

    model_id: str
    stages: list[StageWire]
