"""The host store: each model's weights copied once per machine into shared memory.

Layout under the root (default `/dev/shm/c2cserve`, env `C2C_HOST_STORE`):

    store.lock                  exclusive flock while copying in or evicting
    models/<key>/weights.bin    raw tensor bytes, each tensor 64-byte aligned
    models/<key>/manifest.json  key, source folder, nbytes, quantize, [name, dtype, shape, offset, nbytes]
                                (HF names, plus fused q|k|v and gate|up views over them)

Quantized copies (`make_resident(dir, quantize="int8" | "q4")`, key suffix `-int8` /
`-q4`): every projection matrix (`*_proj.weight`, Mixtral's `w1|w2|w3`, the LM head) is
stored under its own name plus `<name>_scale`: int8 [N, K] + fp32 [N] per channel
(`c2c_kernels.cpu_int8`, half of bf16's bytes), or q4 = uint8 [N, K/2] two weights a
byte + fp16 [N, K/32] per group of 32 (`c2c_kernels.cpu_q4`, GGUF Q4_0's numbers, 0.28x
bf16's bytes; a matrix whose K is no multiple of 32 stays as it is). A tied LM head gets
a quantized copy of the embedding as `lm_head.weight` (the embedding itself stays in the
checkpoint dtype for lookups).
    models/<key>/config.json    (+ generation_config.json) copied from the checkpoint
    models/<key>/lock           a shared flock per process that has the model open
    models/<key>/last_used      its mtime orders the LRU

A copy is built in `models/.tmp-<key>-<pid>` and renamed into place, so a reader never
sees a half-written model. Every process maps `weights.bin` read-only and makes tensors
as views of the mapping: N processes share one physical copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.errors import C2CError, InvalidRequest, ModelNotFound, NoCapacity
from worker.checkpoint import ModelConfig, TensorEntry, index_checkpoint, load_config
from worker.layers import fusion_groups

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/dev/shm/c2cserve"
ALIGN_BYTES = 64
_COPY_CHUNK_BYTES = 64 * 1024 * 1024
QUANTIZE_MODES = ("int8", "q4")
_Q4_GROUP = 32  # c2c_kernels.cpu_q4.GROUP (not imported: the store loads no kernel code)
_QUANTIZED_SUFFIXES = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", "lm_head.weight")
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
                 "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


def default_root() -> Path:
    return Path(os.environ.get("C2C_HOST_STORE") or DEFAULT_ROOT)


def model_key(model_dir) -> str:
    """Folder name + a hash of its absolute path and its weight files' sizes and mtimes."""
    model_dir = Path(model_dir).resolve()
    digest = hashlib.sha1(str(model_dir).encode())
    for path in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        if path.exists():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{model_dir.name}-{digest.hexdigest()[:10]}"


class HostStore:
    """Shared-memory weights, copied in once per machine; LRU within capacity_bytes."""

    def __init__(self, root: str | Path | None = None, capacity_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.capacity_bytes = capacity_bytes
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.last_copied = False     # did the latest make_resident copy bytes (vs. found it)?

    # ---- residency ----------------------------------------------------------------

    def make_resident(self, model_dir, quantize: str | None = None) -> str:
        """Copy a checkpoint's tensors into the store once; return its model key.

        quantize="int8" | "q4" stores the projection matrices quantized (a separate key).
        Idempotent and safe when processes race (one copies, the others wait and reuse).
        Raises CheckpointError for a bad checkpoint, InvalidRequest for an unknown
        quantize mode, NoCapacity when evicting every unused model still leaves too
        little room.
        """
        if quantize is not None and quantize not in QUANTIZE_MODES:
            raise InvalidRequest(f"quantize={quantize!r} is not one of {list(QUANTIZE_MODES)}", param="quantize")
        model_dir = Path(model_dir)
        key = model_key(model_dir) + (f"-{quantize}" if quantize else "")
        self.last_copied = False
        if self._is_resident(key):
            self._touch(key)
            return key
        config, entries = index_checkpoint(model_dir)
        if quantize and config.tie_word_embeddings and "lm_head.weight" not in entries:
            embed = entries["model.embed_tokens.weight"]
            entries["lm_head.weight"] = TensorEntry("lm_head.weight", embed.dtype, embed.shape, embed.path,
                                                    embed.start, embed.nbytes)
        with self._store_lock():
            if not self._is_resident(key):      # another process may have finished meanwhile
                nbytes = _layout(entries, quantize)[2]
                self._make_room(nbytes, key)
                self._copy_in(key, model_dir, entries, quantize)
                self.last_copied = True
        self._touch(key)
        return key

    def resident_models(self) -> list[tuple[str, int]]:
        """(model_key, nbytes) of every resident model, least recently used first."""
        found = []
        for path in self.models_dir.iterdir():
            manifest = path / "manifest.json"
            if path.name.startswith(".") or not manifest.is_file():
                continue
            nbytes = json.loads(manifest.read_text())["nbytes"]
            found.append((_mtime(path / "last_used"), path.name, nbytes))
        return [(key, nbytes) for _, key, nbytes in sorted(found)]

    def used_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.resident_models())

    def is_in_use(self, key: str) -> bool:
        """True when some process (this one included) has the model open."""
        with open(self.models_dir / key / "lock", "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def evict(self, model_key: str) -> bool:
        """Remove a model from the store; False if some process has it open."""
        with self._store_lock():
            return self._evict_locked(model_key)

    # ---- mapping ------------------------------------------------------------------

    def open(self, model_key_or_dir) -> ResidentModel:
        """Map a model (making a checkpoint folder resident first); marks it in use.

        Raises ModelNotFound for a key that is not resident.
        """
        key = str(model_key_or_dir)
        if Path(key).is_dir() and (Path(key) / "config.json").is_file():
            key = self.make_resident(key)
        path = self.models_dir / key
        if not (path / "manifest.json").is_file():
            raise ModelNotFound(f"model {key!r} is not resident in the host store {self.root}")
        lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        if not (path / "manifest.json").is_file():     # evicted between the check and the lock
            os.close(lock_fd)
            raise ModelNotFound(f"model {key!r} was evicted from the host store {self.root}")
        self._touch(key)
        return ResidentModel.map(path, lock_fd)

    # ---- internals ----------------------------------------------------------------

    def _is_resident(self, key: str) -> bool:
        return (self.models_dir / key / "manifest.json").is_file()

    def _touch(self, key: str) -> None:
        marker = self.models_dir / key / "last_used"
        marker.touch()
        now = time.time()
        os.utime(marker, (now, now))

    def _store_lock(self):
        return _FileLock(self.root / "store.lock")

    def _make_room(self, nbytes: int, key: str) -> None:
        if self.capacity_bytes is not None and nbytes > self.capacity_bytes:
            raise NoCapacity(f"model {key} needs {nbytes / 1e6:.1f} MB, host store capacity is "
                             f"{self.capacity_bytes / 1e6:.1f} MB")
        for victim, _ in self.resident_models():
            if self._fits(nbytes):
                return
            if self._evict_locked(victim):
                log.info("host store: evicted %s (LRU) to fit %s", victim, key)
        if not self._fits(nbytes):
            raise NoCapacity(f"host store {self.root} is full: model {key} needs {nbytes / 1e6:.1f} MB "
                             f"and every resident model is in use (used {self.used_bytes() / 1e6:.1f} MB)")

    def _fits(self, nbytes: int) -> bool:
        if shutil.disk_usage(self.root).free < nbytes:
            return False
        return self.capacity_bytes is None or self.used_bytes() + nbytes <= self.capacity_bytes

    def _evict_locked(self, key: str) -> bool:
        path = self.models_dir / key
        if not path.is_dir():
            return False
        with open(path / "lock", "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            trash = self.models_dir / f".evicted-{key}-{os.getpid()}"
            path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _copy_in(self, key: str, model_dir: Path, entries: dict[str, TensorEntry],
                 quantize: str | None = None) -> None:
        tmp = self.models_dir / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            manifest = _write_weights(tmp / "weights.bin", entries, quantize)
            for name in ("config.json", "generation_config.json"):
                if (model_dir / name).is_file():
                    shutil.copyfile(model_dir / name, tmp / name)
            manifest.update(key=key, model_dir=str(model_dir.resolve()), quantize=quantize)
            (tmp / "manifest.json").write_text(json.dumps(manifest))
            (tmp / "lock").touch()
            tmp.rename(self.models_dir / key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("host store: copied %s in (%.1f MB)", key, manifest["nbytes"] / 1e6)


def _is_quantized(entry: TensorEntry, quantize: str | None) -> bool:
    if quantize is None or len(entry.shape) != 2 or not entry.name.endswith(_QUANTIZED_SUFFIXES):
        return False
    return quantize != "q4" or entry.shape[1] % _Q4_GROUP == 0


def _quantized_form(shape, quantize: str) -> tuple[tuple[str, list[int], int], tuple[str, list[int], int]]:
    """(dtype, shape, nbytes) of a quantized matrix [N, K] as stored, and of its scales."""
    n, k = shape
    if quantize == "int8":
        return ("int8", [n, k], n * k), ("float32", [n], 4 * n)
    return ("uint8", [n, k // 2], n * k // 2), ("float16", [n, k // _Q4_GROUP], 2 * n * (k // _Q4_GROUP))


def _stored_bytes(entry: TensorEntry, quantize: str | None) -> int:
    return _quantized_form(entry.shape, quantize)[0][2] if _is_quantized(entry, quantize) else entry.nbytes


def _scale_bytes(entry: TensorEntry, quantize: str | None) -> int:
    return _quantized_form(entry.shape, quantize)[1][2] if _is_quantized(entry, quantize) else 0


def _layout(entries: dict[str, TensorEntry], quantize: str | None = None
            ) -> tuple[list[tuple[TensorEntry, int, int | None]], list[dict], int]:
    """Each tensor's offset in weights.bin (and its int8 scales' offset, or None), the
    fused tensors, and the file's total size.

    The parts of a fusion group (q|k|v, gate|up) are placed back to back, so the fused
    matrix is one contiguous view (and so are the parts' scales); every other tensor
    starts 64-byte aligned.
    """
    groups = fusion_groups({n: (e.shape, e.dtype) for n, e in entries.items()})
    placed, fused, offset = [], [], 0
    for fused_name, parts in groups:
        offset = _align(offset)
        first = entries[parts[0]]
        is_q = _is_quantized(first, quantize)
        rows = sum(entries[p].shape[0] for p in parts)
        nbytes = sum(_stored_bytes(entries[p], quantize) for p in parts)
        (dtype, shape, _), (scale_dtype, scale_shape, _) = (
            _quantized_form(first.shape, quantize) if is_q else ((first.dtype, list(first.shape), 0), (None, [], 0)))
        fused.append({"name": fused_name, "dtype": dtype, "shape": [rows, *shape[1:]], "offset": offset,
                      "nbytes": nbytes})
        scale_offset = _align(offset + nbytes) if is_q else None
        if is_q:
            fused.append({"name": fused_name + "_scale", "dtype": scale_dtype, "shape": [rows, *scale_shape[1:]],
                          "offset": scale_offset, "nbytes": sum(_scale_bytes(entries[p], quantize) for p in parts)})
        for part in parts:
            placed.append((entries[part], offset, scale_offset))
            offset += _stored_bytes(entries[part], quantize)
            scale_offset = scale_offset + _scale_bytes(entries[part], quantize) if is_q else None
        offset = offset if scale_offset is None else scale_offset
    grouped = {p for _, parts in groups for p in parts}
    for entry in sorted(entries.values(), key=lambda e: (str(e.path), e.start, e.name)):
        if entry.name not in grouped:
            offset = _align(offset)
            scale_offset = _align(offset + _stored_bytes(entry, quantize)) if _is_quantized(entry, quantize) else None
            placed.append((entry, offset, scale_offset))
            offset = offset + entry.nbytes if scale_offset is None else scale_offset + _scale_bytes(entry, quantize)
    return placed, fused, _align(offset)


def _align(offset: int) -> int:
    return -(-offset // ALIGN_BYTES) * ALIGN_BYTES


def _write_weights(dest: Path, entries: dict[str, TensorEntry], quantize: str | None = None) -> dict:
    placed, fused, total = _layout(entries, quantize)
    tensors = []
    with open(dest, "wb") as out:
        out.truncate(total)
        sources: dict[Path, object] = {}
        try:
            for entry, offset, scale_offset in sorted(placed, key=lambda p: (str(p[0].path), p[0].start)):
                src = sources.get(entry.path) or sources.setdefault(entry.path, open(entry.path, "rb"))
                if scale_offset is None:
                    _copy_range(src, entry.start, out, offset, entry.nbytes)
                    tensors.append({"name": entry.name, "dtype": entry.dtype, "shape": list(entry.shape),
                                    "offset": offset, "nbytes": entry.nbytes})
                else:
                    tensors += _write_quantized(src, entry, out, offset, scale_offset, quantize)
        finally:
            for f in sources.values():
                f.close()
    return {"nbytes": total, "tensors": tensors + fused}


def _write_quantized(src, entry: TensorEntry, out, offset: int, scale_offset: int, quantize: str) -> list[dict]:
    """Read one matrix, quantize it (int8 per row or q4 per group), write it at offset and
    its scales at scale_offset."""
    from c2c_kernels.cpu_int8 import quantize_int8
    from c2c_kernels.cpu_q4 import quantize_q4

    src.seek(entry.start)
    raw = bytearray(src.read(entry.nbytes))
    if len(raw) != entry.nbytes:
        raise C2CError(f"{src.name}: file ended while copying into the host store")
    w = torch.frombuffer(raw, dtype=_TORCH_DTYPES[entry.dtype]).view(entry.shape)  # [N, K]
    q, scale = (quantize_int8 if quantize == "int8" else quantize_q4)(w)
    for data, at in ((q, offset), (scale, scale_offset)):
        out.seek(at)
        out.write(data.contiguous().view(torch.uint8).numpy().tobytes())
    (dtype, shape, nbytes), (scale_dtype, scale_shape, scale_nbytes) = _quantized_form(entry.shape, quantize)
    return [{"name": entry.name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes},
            {"name": entry.name + "_scale", "dtype": scale_dtype, "shape": scale_shape, "offset": scale_offset,
             "nbytes": scale_nbytes}]


def _copy_range(src, src_offset: int, out, dst_offset: int, nbytes: int) -> None:
    src.seek(src_offset)
    out.seek(dst_offset)
    remaining = nbytes
    while remaining > 0:
        chunk = src.read(min(remaining, _COPY_CHUNK_BYTES))
        if not chunk:
            raise C2CError(f"{src.name}: file ended while copying into the host store")
        out.write(chunk)
        remaining -= len(chunk)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class _FileLock:
    """An exclusive flock on a file, as a context manager (blocks until acquired)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


@dataclass
class ResidentModel:
    """A model mapped from the host store: zero-copy, read-only tensor views."""

    key: str
    model_dir: Path
    config: ModelConfig
    nbytes: int
    path: Path
    _manifest: dict
    _mmap: mmap.mmap | None
    _lock_fd: int | None

    @classmethod
    def map(cls, path: Path, lock_fd: int) -> ResidentModel:
        manifest = json.loads((path / "manifest.json").read_text())
        with open(path / "weights.bin", "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if manifest["nbytes"] else None
        return cls(manifest["key"], Path(manifest["model_dir"]), load_config(path), manifest["nbytes"],
                   path, manifest, mapped, lock_fd)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> read-only view of the shared mapping (writing to one crashes the process).

        HF names, plus fused `*.qkv_proj.weight|bias` and `*.gate_up_proj.weight`: row
        concatenations whose parts are the HF tensors (same bytes, no copy).
        """
        if self._lock_fd is None:
            raise C2CError(f"model {self.key} was closed")
        buffer = np.frombuffer(self._mmap, dtype=np.uint8) if self._mmap is not None else np.empty(0, np.uint8)
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)    # "non-writable" tensors: on purpose
            for t in self._manifest["tensors"]:
                raw = torch.from_numpy(buffer[t["offset"]:t["offset"] + t["nbytes"]])
                out[t["name"]] = raw.view(_TORCH_DTYPES[t["dtype"]]).view(t["shape"])
        return out

    def close(self) -> None:
        """No longer in use by this process (views already handed out stay valid)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        self._mmap = None

    def __enter__(self) -> ResidentModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
