"""The model catalog in Redis (`c2c:model:<id>`): model id -> checkpoint folder.

Model id = the checkpoint folder's name. Reading a checkpoint's `config.json` here needs
no torch, so the gateway and launcher stay light.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import msgspec

from services import keys
from services.errors import CheckpointError
from services.schemas import ModelEntry

log = logging.getLogger(__name__)


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
        created_s=int(model_dir.stat().st_mtime),
    )


def to_hash(entry: ModelEntry) -> dict[str, str]:
    return {k: str(v) for k, v in msgspec.structs.asdict(entry).items()}


def _from_hash(fields: dict[str, str]) -> ModelEntry:
    return msgspec.convert(fields, ModelEntry, strict=False)


async def register(redis, model_dirs: list[str | Path]) -> list[ModelEntry]:
    """Write one catalog entry per checkpoint folder; returns them."""
    entries = [entry_for(d) for d in model_dirs]
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.hset(keys.model(entry.model_id), mapping=to_hash(entry))
        await pipe.execute()
    log.info("catalog: registered %s", ", ".join(e.model_id for e in entries))
    return entries


async def load_all(redis) -> dict[str, ModelEntry]:
    """Every catalog entry by model id (SCAN, not KEYS, so it never blocks Redis)."""
    model_keys = [k async for k in redis.scan_iter(match=keys.MODEL_PATTERN, count=500)]
    if not model_keys:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for key in model_keys:
            pipe.hgetall(key)
        rows = await pipe.execute()
    entries = {}
    for row in rows:
        if row:
            entry = _from_hash(row)
            entries[entry.model_id] = entry
    return entries


async def lookup(redis, model_id: str) -> ModelEntry | None:
    row = await redis.hgetall(keys.model(model_id))
    return _from_hash(row) if row else None


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Every checkpoint folder (one holding config.json) directly under `root`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root}: models folder does not exist")
    return sorted(p.parent for p in root.glob("*/config.json"))
