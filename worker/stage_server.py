"""A pipeline stage server: layer ranges of models, served over NATS to an engine.

Every worker hosts one on its own connection, with its worker id as stage id (its slice
can run stages of another worker's pipeline); `python -m worker.stage_server --nats URL
--id ID [--cores 1] [--threads 1]` runs one alone. It answers
`StageCall` frames on `c2c.stage.<id>` (subjects.stage): `load` maps a model from the
host store (zero-copy) and makes a KV cache for it (only the pages of its layers are
ever touched), `forward` runs its layers over a micro-batch, `read_kv` / `write_kv`
move KV blocks of some layers (online reconfiguration), `unload` drops it, `ping`
answers at once (liveness, apart from the compute queue).

Calls run one at a time, in arrival order, on one compute thread; the event loop keeps
receiving meanwhile. A call that fails gets a reply with its error; the server goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import logging
import os
from pathlib import Path

import msgspec
import torch

import c2c_kernels as kernels
from services import natsutil, subjects
from services.logutil import setup_logging
from services.stage_wire import PART_HEADER, PARTS_HEADER, StageCall, StageReply
from worker.checkpoint import load_config
from worker.pipeline import StageHost
from worker.runner import ModelRunner
from worker.stage_frames import batch_of_call, decode_frame, encode_frame, split_parts

log = logging.getLogger(__name__)
_PART_MARGIN_BYTES = 4096


class StageServer:
    def __init__(self, nats_url: str, stage_id: str):
        self.nats_url, self.stage_id = nats_url, stage_id
        self._nc, self._owns_nc = None, True
        self._parts: dict[str, list[bytes]] = {}          # reply subject -> parts so far
        self._queue: asyncio.Queue = asyncio.Queue()
        self._compute = cf.ThreadPoolExecutor(1, thread_name_prefix="stage-compute")
        self._hosts: dict[str, tuple[ModelRunner, StageHost]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._forwarded: set[str] = set()                 # slots that ran a forward (logged once)

    async def start(self, nc=None) -> None:
        """Serve on `nc` (a worker's connection: the worker's slice hosts stages too), or on
        a connection of its own after warming the kernels (a ping answered means the first
        forward is fast)."""
        self._owns_nc = nc is None
        if nc is None:
            await natsutil.in_daemon_thread(kernels.warmup)
            nc = await natsutil.connect_nats(self.nats_url, f"c2c-stage-{self.stage_id}")
        self._nc = nc
        await nc.subscribe(subjects.stage(self.stage_id), cb=self._on_msg)
        natsutil.spawn(self._serve(), self._tasks, "stage compute loop")
        await nc.flush()
        log.info("stage server %s listening on %s", self.stage_id, subjects.stage(self.stage_id))

    async def stop(self) -> None:
        await natsutil.shutdown(self._tasks, self._nc if self._owns_nc else None, None)
        self._compute.shutdown(wait=False)

    async def _on_msg(self, msg) -> None:
        """c2c.stage.<id>: one part of a StageCall frame; a whole ping is answered here."""
        parts = self._parts.setdefault(msg.reply, [])
        parts.append(msg.data)
        if len(parts) < int((msg.headers or {}).get(PARTS_HEADER, "1")):
            return
        del self._parts[msg.reply]
        try:
            call, tensors = decode_frame(StageCall, bytearray(b"".join(parts)))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            log.warning("dropped a malformed stage call: %s", exc)
            return
        if call.op == "ping":
            await self._reply(msg.reply, StageReply(), {})
        else:
            self._queue.put_nowait((msg.reply, call, tensors))

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            reply_to, call, tensors = await self._queue.get()
            try:
                out = await loop.run_in_executor(self._compute, self._handle, call, tensors)
                reply = StageReply()
            except Exception as exc:  # the caller is told; the server goes on
                log.exception("stage call %s on %s failed", call.op, call.slot_id)
                out, reply = {}, StageReply(error=f"{type(exc).__name__}: {exc}")
            await self._reply(reply_to, reply, out)

    async def _reply(self, reply_to: str, reply: StageReply, tensors: dict) -> None:
        parts = split_parts(encode_frame(reply, tensors), max(1024, self._nc.max_payload - _PART_MARGIN_BYTES))
        for i, part in enumerate(parts):
            await self._nc.publish(reply_to, bytes(part), headers={PART_HEADER: str(i), PARTS_HEADER: str(len(parts))})

    def _handle(self, call: StageCall, tensors: dict) -> dict:
        with torch.inference_mode():
            if call.op == "load":
                self._load(call)
                return {}
            if call.op == "unload":
                runner, _ = self._hosts.pop(call.slot_id, (None, None))
                if runner is not None:
                    runner.unload(call.slot_id)
                return {}
            host = self._hosts[call.slot_id][1]
            if call.op == "forward":
                if call.slot_id not in self._forwarded:
                    self._forwarded.add(call.slot_id)
                    log.info("stage %s: first forward of %s", self.stage_id, call.slot_id)
                return {"out": host.forward(*batch_of_call(call, tensors))}
            if call.op == "read_kv":
                k, v = host.read_kv(call.start, call.end, call.block_ids)
                return {"k": k, "v": v}
            if call.op == "write_kv":
                host.write_kv(call.start, call.end, call.block_ids, tensors["k"], tensors["v"])
                return {}
        raise ValueError(f"unknown stage op {call.op!r}")

    def _load(self, call: StageCall) -> None:
        """Map the model and make a KV cache of the engine's block count (its layers only are touched)."""
        config = load_config(call.model_dir)
        kv_dtype = getattr(torch, call.kv_dtype)
        runner = ModelRunner(call.block_size, kv_cache_bytes=0, kv_dtype=kv_dtype, quantize=call.quantize or None)
        runner.quantize = call.quantize or None  # the engine's choice, not this process's C2C_QUANTIZE
        runner.register(call.slot_id, Path(call.model_dir), config)
        runner.slots[call.slot_id].num_blocks = call.num_blocks
        runner.ensure_loaded(call.slot_id, lambda model_id: True)
        slot = runner.slots[call.slot_id]
        self._hosts[call.slot_id] = (runner, StageHost(slot.model, slot.kv, call.start, call.end))
        log.info("stage %s: %s layers [%d, %d), %d KV blocks", self.stage_id, call.slot_id,
                 call.start, call.end, call.num_blocks)


def spawn(nats_url: str, stage_id: str, core: int | None = None, threads: int = 1, timeout_s: float = 120.0,
          log_path: Path | None = None):
    """A stage server process (`python -m worker.stage_server`), returned once it answers
    a ping (its kernels warm); it inherits this environment (host store, PYTHONPATH).
    log_path: its log goes there (else to this process's stderr)."""
    import subprocess
    import sys
    import time

    from worker.stage_client import StageClient

    cmd = [sys.executable, "-m", "worker.stage_server", "--nats", nats_url, "--id", stage_id, "--threads", str(threads)]
    log_file = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd + (["--cores", str(core)] if core is not None else []), stderr=log_file)
    if log_file is not None:
        log_file.close()
    client = StageClient(nats_url)
    deadline_s = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.call(stage_id, StageCall("ping")).result(timeout=5)
                return proc
            except Exception:  # not up yet: retried until the deadline
                if time.monotonic() > deadline_s or proc.poll() is not None:
                    proc.kill()
                    raise
                time.sleep(0.2)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.stage_server", description=__doc__.splitlines()[0])
    parser.add_argument("--nats", required=True, help="NATS URL")
    parser.add_argument("--id", required=True, help="stage id (its subject is c2c.stage.<id>)")
    parser.add_argument("--cores", default="", help="CPU cores to run on, e.g. 1 or 2,3 (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.cores:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    natsutil.run(natsutil.serve_until_signal(StageServer(args.nats, args.id)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
