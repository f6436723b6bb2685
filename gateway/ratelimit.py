"""Per-tenant limits and usage in Redis, atomic across every gateway (Lua scripts).

Requests and tokens per minute are token buckets, one per tenant and limit: capacity = the
per-minute limit, refilled continuously at limit/60 per second (so a tenant may burst up to
one minute's worth, then runs at its rate; there is no window edge where twice the limit
passes). Each bucket is a hash (level, ts) read, refilled and charged in one script, on
Redis' own clock (`TIME`), so gateways with skewed clocks agree. Retry-After is exact: the
time until the bucket holds what the request needs.

Tokens per minute are charged at admission with an estimate (prompt characters / 4 plus
`max_tokens`, as OpenAI counts) and corrected when the request ends with the real usage (a
refund, or a debt that later requests wait out). A request that needs more than the whole
capacity is admitted when the bucket is full, so none is refused forever.

Concurrency is a sorted set of leases (request id -> expiry in Redis time): admission adds
one, every exit path removes it, and a gateway renews the leases of its open requests, so a
crashed gateway's slots come back after `LEASE_S` at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services import keys
from services.tenants import Tenant

LEASE_S = 30.0  # a concurrency slot is held this long unless renewed
RENEW_EVERY_S = 10.0

_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, limit)
  local v = redis.call('HMGET', key, 'level', 'ts')
  if not v[1] then return limit end
  return math.min(limit, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * limit / 60)
end
local function store(key, limit, lvl)
  redis.call('HSET', key, 'level', string.format('%.6f', lvl), 'ts', string.format('%.6f', now))
  redis.call('EXPIRE', key, math.ceil((limit - lvl) * 60 / limit) + 1)
end
"""

# KEYS: rpm bucket, tpm bucket, inflight set. ARGV: rpm, tpm, max_concurrent (0: unlimited),
# estimated tokens, request id, lease s. -> {0 admitted | 1 rpm | 2 tpm | 3 concurrency, wait ms, used}
_ADMIT = _BUCKET + """
local rpm, tpm, max_conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local need_tokens, lease_s = tonumber(ARGV[4]), tonumber(ARGV[6])
local r_level, t_level = 0, 0
if rpm > 0 then
  r_level = level(KEYS[1], rpm)
  if r_level < 1 then return {1, math.ceil((1 - r_level) * 60000 / rpm), math.ceil(rpm - r_level)} end
end
if tpm > 0 then
  t_level = level(KEYS[2], tpm)
  local need = math.min(need_tokens, tpm)
  if t_level < need then return {2, math.ceil((need - t_level) * 60000 / tpm), math.ceil(tpm - t_level)} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if max_conc > 0 then
  local n = redis.call('ZCARD', KEYS[3])
  if n >= max_conc then return {3, 1000, n} end
end
if rpm > 0 then store(KEYS[1], rpm, r_level - 1) end
if tpm > 0 then store(KEYS[2], tpm, t_level - need_tokens) end
redis.call('ZADD', KEYS[3], now + lease_s, ARGV[5])
redis.call('EXPIRE', KEYS[3], math.ceil(lease_s * 2))
return {0, 0, 0}
"""

# KEYS: tpm bucket, inflight set, usage hash. ARGV: tpm (0: unlimited), request id, tokens to
# give back (estimate - actual; negative: a debt), model, prompt tokens, completion tokens,
# 1 to count a finished request (0: nothing to count)
_FINISH = _BUCKET + """
redis.call('ZREM', KEYS[2], ARGV[2])
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[3])
if tpm > 0 and refund ~= 0 then store(KEYS[1], tpm, math.min(tpm, level(KEYS[1], tpm) + refund)) end
if ARGV[7] == '1' then
  redis.call('HINCRBY', KEYS[3], ARGV[4] .. '|requests', 1)
  redis.call('HINCRBY', KEYS[3], ARGV[4] .. '|prompt_tokens', ARGV[5])
  redis.call('HINCRBY', KEYS[3], ARGV[4] .. '|completion_tokens', ARGV[6])
end
return 0
"""

# KEYS: inflight set. ARGV: lease s, request ids -> how many leases were still there
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 2))
return n
"""

# KEYS: inflight set -> live leases
_IN_FLIGHT = """
local t = redis.call('TIME')
return redis.call('ZCOUNT', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, '+inf')
"""

LIMIT_OF_CODE = {1: "requests_per_minute", 2: "tokens_per_minute", 3: "max_concurrent"}


@dataclass(frozen=True)
class Refusal:
    """Why admission failed: which limit, how long until it would pass, how much is used."""

    limit: str
    retry_after_s: int
    num_used: int


class Limiter:
    """The scripts, registered once on a Redis client (EVALSHA, reloaded after a flush)."""

    def __init__(self, redis):
        self._admit = redis.register_script(_ADMIT)
        self._finish = redis.register_script(_FINISH)
        self._renew = redis.register_script(_RENEW)
        self._in_flight = redis.register_script(_IN_FLIGHT)
        self.redis = redis

    async def admit(self, tenant: Tenant, request_id: str, num_tokens: int) -> Refusal | None:
        """Charge one request and `num_tokens` and take a concurrency lease, all or nothing."""
        limits = tenant.limits
        code, wait_ms, used = await self._admit(
            keys=[keys.tenant_bucket(tenant.name, "rpm"), keys.tenant_bucket(tenant.name, "tpm"),
                  keys.tenant_inflight(tenant.name)],
            args=[limits.requests_per_minute or 0, limits.tokens_per_minute or 0, limits.max_concurrent or 0,
                  num_tokens, request_id, LEASE_S])
        if int(code) == 0:
            return None
        return Refusal(LIMIT_OF_CODE[int(code)], max(1, math.ceil(int(wait_ms) / 1000)), int(used))

    async def finish(self, tenant: Tenant, request_id: str, model_id: str, num_refund_tokens: int,
                     num_prompt_tokens: int, num_completion_tokens: int, is_counted: bool) -> None:
        """Release the lease, correct the token charge, add the usage."""
        await self._finish(
            keys=[keys.tenant_bucket(tenant.name, "tpm"), keys.tenant_inflight(tenant.name),
                  keys.tenant_usage(tenant.name)],
            args=[tenant.limits.tokens_per_minute or 0, request_id, num_refund_tokens, model_id,
                  num_prompt_tokens, num_completion_tokens, "1" if is_counted else "0"])

    async def renew(self, tenant_to_request_ids: dict[str, list[str]]) -> None:
        for tenant_name, request_ids in tenant_to_request_ids.items():
            await self._renew(keys=[keys.tenant_inflight(tenant_name)], args=[LEASE_S, *request_ids])

    async def in_flight(self, tenant_name: str) -> int:
        return int(await self._in_flight(keys=[keys.tenant_inflight(tenant_name)]))

    async def usage(self, tenant_name: str) -> dict[str, dict[str, int]]:
        """model -> {requests, prompt_tokens, completion_tokens, total_tokens}."""
        fields = await self.redis.hgetall(keys.tenant_usage(tenant_name))
        model_to_usage: dict[str, dict[str, int]] = {}
        for name, value in fields.items():
            model_id, _, what = name.rpartition("|")
            row = model_to_usage.setdefault(model_id, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
            row[what] = int(value)
        for row in model_to_usage.values():
            row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        return model_to_usage
