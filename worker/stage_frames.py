"""Frames of pipeline stage calls: a msgpack header, then its tensors as raw bytes.

Layout: 4-byte big-endian header length, the header (`services.stage_wire`), then each
tensor's bytes in the header's order, every piece starting at a multiple of 8 bytes.
Decoding makes tensors over the received buffer (no copy), so it must be writable.
"""

from __future__ import annotations

import msgspec
import numpy as np
import torch

from services.stage_wire import StageCall, TensorInfo
from worker.forward_batch import ForwardBatch

_ALIGN = 8
_LEN_BYTES = 4


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def encode_frame(header, tensors: dict[str, torch.Tensor]) -> bytearray:
    """header (StageCall / StageReply; its `tensors` list is filled in) + tensors as one frame."""
    flat = {name: t.detach().contiguous().reshape(-1).view(torch.uint8) for name, t in tensors.items()}
    header.tensors = [TensorInfo(name, str(t.dtype).removeprefix("torch."), list(t.shape))
                      for name, t in tensors.items()]
    head = msgspec.msgpack.encode(header)
    offset = _aligned(_LEN_BYTES + len(head))
    total = offset + sum(_aligned(b.numel()) for b in flat.values())
    frame = bytearray(total)
    frame[:_LEN_BYTES] = len(head).to_bytes(_LEN_BYTES, "big")
    frame[_LEN_BYTES:_LEN_BYTES + len(head)] = head
    view = np.frombuffer(frame, dtype=np.uint8)
    for raw in flat.values():
        view[offset:offset + raw.numel()] = raw.numpy()
        offset += _aligned(raw.numel())
    return frame


def decode_frame(message_type: type, frame: bytearray) -> tuple:
    """(header, {name: tensor}) of a frame; the tensors are views of `frame`."""
    head_len = int.from_bytes(frame[:_LEN_BYTES], "big")
    header = msgspec.msgpack.decode(bytes(frame[_LEN_BYTES:_LEN_BYTES + head_len]), type=message_type)
    offset, tensors = _aligned(_LEN_BYTES + head_len), {}
    for info in header.tensors:
        dtype = getattr(torch, info.dtype)
        nbytes = int(np.prod(info.shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            tensors[info.name] = torch.empty(info.shape, dtype=dtype)
        else:
            raw = torch.frombuffer(frame, dtype=torch.uint8, count=nbytes, offset=offset)
            tensors[info.name] = raw.view(dtype).view(info.shape)
        offset += _aligned(nbytes)
    return header, tensors


def split_parts(frame: bytearray, part_bytes: int) -> list[memoryview]:
    """The frame in pieces of at most part_bytes (one piece at least)."""
    view = memoryview(frame)
    return [view[i:i + part_bytes] for i in range(0, max(1, len(frame)), part_bytes)]


def forward_call(slot_id: str, batch: ForwardBatch, x: torch.Tensor | None) -> tuple[StageCall, dict]:
    """A `forward` call's header and tensors for one micro-batch (x: the residual stream)."""
    tensors = {"input_ids": batch.input_ids, "positions": batch.positions,
               "slot_mapping": batch.slot_mapping, "logits_indices": batch.logits_indices}
    if x is not None:
        tensors["x"] = x
    call = StageCall("forward", slot_id, query_lens=list(batch.query_lens),
                     context_lens=list(batch.context_lens), block_tables=[list(t) for t in batch.block_tables])
    return call, tensors


def batch_of_call(call: StageCall, tensors: dict) -> tuple[ForwardBatch, torch.Tensor | None]:
    batch = ForwardBatch(tensors["input_ids"], tensors["positions"], call.query_lens, call.context_lens,
                         call.block_tables, tensors["slot_mapping"], tensors["logits_indices"])
    return batch, tensors.get("x")
