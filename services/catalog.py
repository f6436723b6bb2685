"""The model catalog in Redis (`c2c:model:<id>`): model id -> checkpoint folder.

Model id = the checkpoint folder's name. Reading a checkpoint's `config.json` here needs
no torch, so the gateway and launcher stay light.

Confinement: an entry is only a path some process wrote to Redis, and a worker opens
whatever it names. With model roots (C2C_MODEL_ROOTS, `parse_roots`), `check_path` admits
a checkpoint folder only when its real path (symlinks resolved) lies under a root's real
path; `lookup` and `load_all` treat an entry outside every root as absent (logged) and
hand out the resolved path, the one that was checked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import msgspec

from services import keys, slo
from services.errors import CheckpointError, InvalidRequest
from services.schemas import ModelEntry

log = logging.getLogger(__name__)
_refused_entries: set[tuple[str, str]] = set()  # (model id, path) already warned about


def parse_roots(text: str) -> list[str]:
    """C2C_MODEL_ROOTS (comma-separated folders) -> the list; empty: no confinement."""
    return [root.strip() for root in text.split(",") if root.strip()]


def check_path(path: str | Path, roots: list[str]) -> Path:
    """The real path of `path` (symlinks and `..` resolved) when it lies under the real
    path of one of `roots`; raises CheckpointError otherwise. No roots: anything goes."""
    resolved = Path(path).expanduser().resolve()
    if not roots:
        return resolved
    real_roots = [Path(root).expanduser().resolve() for root in roots]
    if any(resolved.is_relative_to(root) for root in real_roots):
        return resolved
    raise CheckpointError(
        f"{path}: resolves to {resolved}, outside the model roots "
        f"({', '.join(str(r) for r in real_roots)}; set by C2C_MODEL_ROOTS)")


def _confined(entry: ModelEntry, roots: list[str] | None) -> ModelEntry | None:
    """`entry` with its checked real path, or None (warned once per entry) when it lies
    outside `roots`. No roots: the entry as stored."""
    if not roots:
        return entry
    try:
        real_path = check_path(entry.path, roots)
    except CheckpointError as exc:
        if (entry.model_id, entry.path) not in _refused_entries:
            _refused_entries.add((entry.model_id, entry.path))
            log.warning("catalog: refused model %s: %s", entry.model_id, exc)
        return None
    return msgspec.structs.replace(entry, path=str(real_path))


def entry_for(model_dir: str | Path, owner: str = "public") -> ModelEntry:
    """A catalog entry for a checkpoint folder; raises CheckpointError naming the file."""
    model_dir = Path(model_dir).expanduser().resolve()
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read the model config ({exc})") from exc
    nbytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return ModelEntry(
        model_id=model_dir.name, path=str(model_dir), arch=str(config.get("model_type", "")),
        nbytes=nbytes, owner=owner,
        context_window=int(config.get("max_position_embeddings") or 0),
        created_s=int(model_dir.stat().st_mtime), **serving_defaults(model_dir),
    )


SERVING_FILE = "c2cserve.json"  # optional, beside config.json: the model's serving defaults


def serving_defaults(model_dir: Path) -> dict:
    """The model's SLO defaults from `<model>/c2cserve.json`, e.g.
    `{"slo_class": "batch", "ttft_slo_ms": 5000, "tpot_slo_ms": 500}` (every key optional;
    see services/slo.py); {} without the file. A bad file raises CheckpointError."""
    path = model_dir / SERVING_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from exc
    if not isinstance(raw, dict) or set(raw) - {"slo_class", "ttft_slo_ms", "tpot_slo_ms"}:
        raise CheckpointError(f"{path}: expected an object with slo_class, ttft_slo_ms, tpot_slo_ms")
    try:
        slo_class = slo.parse_slo_class(raw.get("slo_class"), "slo_class") or ""
    except InvalidRequest as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    out: dict = {"slo_class": slo_class} if slo_class else {}
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
            raise CheckpointError(f"{path}: {name} must be a positive number of milliseconds")
        out[name] = float(value)
    return out


def to_hash(entry: ModelEntry) -> dict[str, str]:
    return {k: str(v) for k, v in msgspec.structs.asdict(entry).items()}


def _from_hash(fields: dict[str, str]) -> ModelEntry:
    return msgspec.convert(fields, ModelEntry, strict=False)


async def register(redis, model_dirs: list[str | Path], roots: list[str] | None = None) -> list[ModelEntry]:
    """Write one catalog entry per checkpoint folder; returns them. A folder outside
    `roots` raises CheckpointError before anything is written."""
    entries = [entry_for(check_path(d, roots or [])) for d in model_dirs]
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.hset(keys.model(entry.model_id), mapping=to_hash(entry))
        await pipe.execute()
    log.info("catalog: registered %s", ", ".join(e.model_id for e in entries))
    return entries


async def load_all(redis, roots: list[str] | None = None) -> dict[str, ModelEntry]:
    """Every catalog entry by model id (SCAN, not KEYS, so it never blocks Redis); with
    `roots`, only those inside them (see `check_path`)."""
    model_keys = [k async for k in redis.scan_iter(match=keys.MODEL_PATTERN, count=500)]
    if not model_keys:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for key in model_keys:
            pipe.hgetall(key)
        rows = await pipe.execute()
    entries = {}
    for row in rows:
        entry = _confined(_from_hash(row), roots) if row else None
        if entry is not None:
            entries[entry.model_id] = entry
    return entries


async def lookup(redis, model_id: str, roots: list[str] | None = None) -> ModelEntry | None:
    """The catalog entry of `model_id`, or None when there is none or (with `roots`) it
    points outside them."""
    row = await redis.hgetall(keys.model(model_id))
    return _confined(_from_hash(row), roots) if row else None


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Every checkpoint folder (one holding config.json) directly under `root`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root}: models folder does not exist")
    return sorted(p.parent for p in root.glob("*/config.json"))
