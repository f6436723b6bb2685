"""Every Redis key name, built here and nowhere else. Redis is state, never a queue."""

from __future__ import annotations

PREFIX = "c2c"


def worker(worker_id: str) -> str:
    """Hash: the worker's heartbeat record (services.schemas.WorkerInfo fields); has a TTL."""
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"


def worker_id_of(key: str) -> str:
    return key.split(":", 2)[2]


def model(model_id: str) -> str:
    """Hash: catalog entry (services.schemas.ModelEntry fields)."""
    return f"{PREFIX}:model:{model_id}"


MODEL_PATTERN = f"{PREFIX}:model:*"


def host(node: str) -> str:
    """Set: models resident in that node's host store."""
    return f"{PREFIX}:host:{node}"


def cache(worker_id: str) -> str:
    """Hash: model -> cached fraction on that worker's slice."""
    return f"{PREFIX}:cache:{worker_id}"


def request(request_id: str) -> str:
    """Hash: a request's assignment (worker, reply inbox, model) for re-dispatch; has a TTL."""
    return f"{PREFIX}:req:{request_id}"


REQUEST_PATTERN = f"{PREFIX}:req:*"


def request_id_of(key: str) -> str:
    return key.split(":", 2)[2]


def control(worker_id: str) -> str:
    """Hash: the last ControlUpdate sent to a worker."""
    return f"{PREFIX}:control:{worker_id}"


def placer(placer_id: str) -> str:
    """String: a live placer's heartbeat (TTL); the launcher waits for one before workers."""
    return f"{PREFIX}:placer:{placer_id}"


PLACER_PATTERN = f"{PREFIX}:placer:*"


def gateway(gateway_id: str) -> str:
    """String: a live gateway's heartbeat (TTL). A worker aborts the requests of a gateway
    whose key is gone: their client connections died with that gateway."""
    return f"{PREFIX}:gateway:{gateway_id}"


# -- tenants (services/tenants.py, gateway/ratelimit.py) ------------------------------------
# A tenant's keys share a hash tag ({name}), so one Lua script may touch them all on a cluster.
def tenants() -> str:
    """String: the current tenant records as JSON (API keys as sha256 hashes only), written
    by a gateway that loaded its tenants file; every gateway enforces what it holds."""
    return f"{PREFIX}:tenants"


def tenant_bucket(tenant: str, limit: str) -> str:
    """Hash (level, ts): a tenant's token bucket for one limit ("rpm" or "tpm"); has a TTL."""
    return f"{PREFIX}:tenant:{{{tenant}}}:{limit}"


def tenant_inflight(tenant: str) -> str:
    """Sorted set: a tenant's requests in flight (member: request id, score: lease expiry
    in Redis time); gateways renew their leases, a crashed gateway's leases expire."""
    return f"{PREFIX}:tenant:{{{tenant}}}:inflight"


def tenant_usage(tenant: str) -> str:
    """Hash: a tenant's usage, fields `<model>|requests`, `<model>|prompt_tokens`,
    `<model>|completion_tokens` (counters, no TTL)."""
    return f"{PREFIX}:tenant:{{{tenant}}}:usage"
