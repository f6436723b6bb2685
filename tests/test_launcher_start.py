"""LocalCluster start-up failures: the culprit's log lines in the error, the log folder
kept and named, `timeout_s` honoured, progress reported while it waits."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from services.errors import C2CError
from services.launcher import LocalCluster


def _kept_dir(message: str) -> Path:
    found = re.search(r"logs kept in (\S+)\)", message)
    assert found, message
    return Path(found.group(1))


def test_a_service_that_fails_to_start_names_its_log_lines_and_keeps_them(servers, tiny_model):
    lines = []
    cluster = LocalCluster([tiny_model("llama")], nats_url=servers.nats_url, redis_url=servers.redis_url,
                           extra_env={"C2C_FIRST_CHUNK_TIMEOUT_S": "-1"}, progress=lines.append)
    with pytest.raises(C2CError) as exc:
        cluster.start(timeout_s=120)
    message = str(exc.value)
    kept = _kept_dir(message)
    try:
        assert "gateway exited with code" in message and "must be > 0" in message  # its own words
        assert (kept / "gateway.log").is_file()
        assert lines and lines[0] == f"starting; logs in {kept}"
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_start_honours_its_timeout(servers, tiny_model):
    cluster = LocalCluster([tiny_model("llama")], nats_url=servers.nats_url, redis_url=servers.redis_url)
    with pytest.raises(C2CError) as exc:
        cluster.start(timeout_s=0.2)  # no placer registers within 0.2 s of its spawn
    message = str(exc.value)
    kept = _kept_dir(message)
    try:
        assert "start-up timed out after" in message and "--timeout" in message
        assert "waiting on: " in message and "placer" in message
        assert kept.is_dir()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    assert cluster.workdir is None  # stopped: nothing left running
