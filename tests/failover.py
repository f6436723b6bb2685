"""A LocalCluster that notices a dead worker within seconds: fault, supervision and
live-migration tests kill workers on purpose."""

from __future__ import annotations

from services.launcher import LocalCluster

FAST_FAILOVER_ENV = {"C2C_WORKER_EXPIRY_S": "2", "C2C_HEARTBEAT_TTL_S": "1", "C2C_PREWARM_INTERVAL_S": "0"}


def failover_cluster(model_dirs, servers=None, **kwargs) -> LocalCluster:
    """On the session's NATS and Redis (`servers`), or on its own embedded ones (None)."""
    urls = {"nats_url": servers.nats_url, "redis_url": servers.redis_url} if servers is not None else {}
    return LocalCluster(model_dirs, extra_env=FAST_FAILOVER_ENV, **urls, **kwargs)
