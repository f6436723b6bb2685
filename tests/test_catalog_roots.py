"""Catalog confinement: an entry written to Redis that points outside C2C_MODEL_ROOTS
(directly, through `..`, or through a symlink) is refused; real valkey-server, no mocks."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services import catalog, keys
from services.errors import CheckpointError


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 64}')
    return folder


@pytest.fixture
def layout(tmp_path):
    """root/ holds one real checkpoint and a symlink escaping to outside/; outside/ holds
    a checkpoint that must never be loaded."""
    root = tmp_path / "models"
    inside = _checkpoint(root / f"good-{uuid.uuid4().hex[:8]}")
    outside = _checkpoint(tmp_path / "outside" / "evil")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root, inside, outside


def test_parse_roots():
    assert catalog.parse_roots("") == []
    assert catalog.parse_roots(" /models , /mnt/more,,") == ["/models", "/mnt/more"]


def test_check_path_admits_inside_and_refuses_escapes(layout, tmp_path):
    root, inside, outside = layout
    roots = [str(root)]
    assert catalog.check_path(inside, roots) == inside.resolve()
    assert catalog.check_path(root / "missing", roots) == (root / "missing").resolve()  # not yet there: still inside
    for escape in (outside, root / "escape", inside / ".." / ".." / "outside" / "evil", Path("/etc")):
        with pytest.raises(CheckpointError, match="outside the model roots"):
            catalog.check_path(escape, roots)
    with pytest.raises(CheckpointError):
        catalog.check_path(tmp_path / "models-other", roots)  # a shared name prefix is not "under"
    assert catalog.check_path("/etc", []) == Path("/etc").resolve()  # no roots: no confinement


def test_check_path_follows_a_symlinked_root(layout, tmp_path):
    root, inside, _ = layout
    link_root = tmp_path / "models-link"
    link_root.symlink_to(root, target_is_directory=True)
    assert catalog.check_path(link_root / inside.name, [str(link_root)]) == inside.resolve()
    assert catalog.check_path(inside, [str(link_root)]) == inside.resolve()


@pytest.fixture
async def redis_client(servers):
    client = aioredis.from_url(servers.redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def _write_entry(client, model_id: str, path: Path | str, template: Path) -> None:
    """One raw HSET, as anything with write access to Redis could do: a valid entry of
    `template` whose path is rewritten."""
    fields = catalog.to_hash(catalog.entry_for(template))
    fields.update(model_id=model_id, path=str(path))
    await client.hset(keys.model(model_id), mapping=fields)


async def test_lookup_and_load_all_refuse_entries_outside_the_roots(redis_client, layout, caplog):
    root, inside, outside = layout
    tag = uuid.uuid4().hex[:8]
    ids = {name: f"{name}-{tag}" for name in ("good", "evil", "escape", "etc")}
    await _write_entry(redis_client, ids["good"], inside, inside)
    await _write_entry(redis_client, ids["evil"], outside, inside)
    await _write_entry(redis_client, ids["escape"], root / "escape", inside)  # the symlink escaping the root
    await _write_entry(redis_client, ids["etc"], "/etc", inside)
    roots = [str(root)]
    try:
        with caplog.at_level(logging.WARNING, logger="services.catalog"):
            found = {m: await catalog.lookup(redis_client, m, roots) for m in ids.values()}
            everything = await catalog.load_all(redis_client, roots)
        unconfined = await catalog.lookup(redis_client, ids["etc"])
    finally:
        await redis_client.delete(*(keys.model(m) for m in ids.values()))
    assert found[ids["good"]] is not None and found[ids["good"]].path == str(inside.resolve())
    assert [m for m, e in found.items() if e is None] == [ids["evil"], ids["escape"], ids["etc"]]
    assert unconfined is not None and unconfined.path == "/etc"  # no roots: as before
    assert ids["good"] in everything
    assert not {ids["evil"], ids["escape"], ids["etc"]} & set(everything)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(m in warned for m in (ids["evil"], ids["escape"], ids["etc"]))


async def test_register_refuses_a_folder_outside_the_roots(redis_client, layout):
    root, inside, _ = layout
    roots = [str(root)]
    with pytest.raises(CheckpointError, match="outside the model roots"):
        await catalog.register(redis_client, [inside, root / "escape"], roots=roots)
    assert not await redis_client.exists(keys.model(inside.name))  # refused before any write
    (entry,) = await catalog.register(redis_client, [inside], roots=roots)
    await redis_client.delete(keys.model(entry.model_id))
    assert entry.path == str(inside.resolve())
