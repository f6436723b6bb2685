"""Slice discovery: MIG instances (NVML), else whole GPUs, else CPU core sets.

A slice is what one worker process owns. `discover_slices` never imports torch, so the
supervisor can call it before choosing `CUDA_VISIBLE_DEVICES` for each child;
`apply_slice` pins the current process to its slice (CPU affinity, or the visible GPU).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from services.errors import C2CError

log = logging.getLogger(__name__)
CORES_PER_AUTO_CPU_SLICE = 8


@dataclass(frozen=True)
class SliceSpec:
    index: int
    name: str  # "cpu0", "gpu0", "gpu0-mig1": unique on the node
    backend: str  # "cuda" | "cpu"
    gpu: str  # link domain: slices sharing one host link
    profile: str = ""  # e.g. "1g.12gb", "H100", "4 cores"
    memory_bytes: int = 0
    cpu_ids: tuple[int, ...] = ()
    cuda_visible: str = ""  # value for CUDA_VISIBLE_DEVICES (MIG UUID or GPU index)


def _nvml_slices() -> list[SliceSpec]:
    """MIG instances of every MIG-enabled GPU, the whole GPU otherwise; [] without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return _walk_gpus(pynvml)
    finally:
        pynvml.nvmlShutdown()


def _walk_gpus(pynvml) -> list[SliceSpec]:
    specs: list[SliceSpec] = []
    for gpu_index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        gpu_name = _text(pynvml.nvmlDeviceGetName(handle))
        migs = _mig_devices(pynvml, handle)
        if not migs:
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            specs.append(SliceSpec(len(specs), f"gpu{gpu_index}", "cuda", f"gpu{gpu_index}",
                                   gpu_name, memory, cuda_visible=str(gpu_index)))
        for mig_index, mig in enumerate(migs):
            memory = pynvml.nvmlDeviceGetMemoryInfo(mig).total
            uuid = _text(pynvml.nvmlDeviceGetUUID(mig))
            profile = _mig_profile(_text(pynvml.nvmlDeviceGetName(mig)))
            specs.append(SliceSpec(len(specs), f"gpu{gpu_index}-mig{mig_index}", "cuda",
                                   f"gpu{gpu_index}", profile, memory, cuda_visible=uuid))
    return specs


def _mig_devices(pynvml, handle) -> list:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:
        return []
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return []
    migs = []
    for i in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            migs.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))
        except pynvml.NVMLError:
            continue
    return migs


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_profile(name: str) -> str:
    match = re.search(r"\d+g\.\d+gb", name)
    return match.group(0) if match else name


def cpu_slices(num_slices: int = 0, cpu_ids: list[int] | None = None, node: str = "node") -> list[SliceSpec]:
    """Split the cores this process may use into `num_slices` contiguous sets (0: auto)."""
    cpu_ids = sorted(os.sched_getaffinity(0)) if cpu_ids is None else sorted(cpu_ids)
    if num_slices <= 0:
        num_slices = max(1, len(cpu_ids) // CORES_PER_AUTO_CPU_SLICE)
    if num_slices > len(cpu_ids):
        log.warning("%d CPU slices asked for %d cores: slices will share cores", num_slices, len(cpu_ids))
    specs = []
    for index in range(num_slices):
        if num_slices <= len(cpu_ids):
            lo, hi = index * len(cpu_ids) // num_slices, (index + 1) * len(cpu_ids) // num_slices
            ids = tuple(cpu_ids[lo:hi])
        else:
            ids = (cpu_ids[index % len(cpu_ids)],)
        specs.append(SliceSpec(index, f"cpu{index}", "cpu", f"{node}-cpu", f"{len(ids)} cores", cpu_ids=ids))
    return specs


def discover_slices(device: str = "auto", num_slices: int = 0, node: str = "node") -> list[SliceSpec]:
    """The slices of this machine; raises C2CError when device='cuda' and there is no GPU."""
    if device in ("auto", "cuda"):
        gpu_slices = _nvml_slices()
        if gpu_slices:
            return gpu_slices[:num_slices] if num_slices else gpu_slices
        if device == "cuda":
            raise C2CError("--device cuda: NVML found no GPU on this machine")
    return cpu_slices(num_slices, node=node)


def apply_slice(spec: SliceSpec) -> None:
    """Pin this process to its slice; call before torch initializes CUDA or its threads."""
    if spec.backend == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible
        return
    if spec.cpu_ids:
        os.sched_setaffinity(0, spec.cpu_ids)
        os.environ.setdefault("OMP_NUM_THREADS", str(len(spec.cpu_ids)))
        os.environ.setdefault("NUMBA_NUM_THREADS", str(len(spec.cpu_ids)))
