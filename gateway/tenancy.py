"""The gateway's tenants: who is calling, what they may see, their limits and usage.

Off (no tenants file): one optional key (`C2C_API_KEY`) serves everyone, every model is
visible, nothing is limited or accounted, exactly as without this module.

On (`--tenants FILE` / `C2C_TENANTS_FILE`): the gateway validates its file at start (a bad
file stops it, naming tenant and field), writes the records (API keys as sha256 hashes only)
to Redis (`keys.tenants()`) and enforces what Redis holds, so a reload reaches every
gateway. It re-reads its file every `tenants_refresh_s` and at once on SIGHUP: a changed,
valid file is published; an invalid one is logged and ignored, the last good records stay.
A gateway publishes only when its own file changed (or the record is missing), so gateways
do not fight over it. Limits and usage: gateway.ratelimit.

Failures: Redis unavailable at admission -> 503 (NoCapacity); at release -> logged, the
concurrency lease then expires on its own (ratelimit.LEASE_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.ratelimit import RENEW_EVERY_S, Limiter, Refusal
from gateway.tenant_metrics import TenantMetrics
from services import keys, natsutil, tenants
from services.config import GatewayConfig
from services.errors import C2CError, ErrorCode, NoCapacity, RateLimited
from services.schemas import FinishReason, ModelEntry
from services.tenants import Tenant, Tenants

log = logging.getLogger(__name__)
_CHARS_PER_TOKEN = 4  # the prompt estimate at admission (corrected with the real count at the end)
_DONE = (FinishReason.STOP, FinishReason.LENGTH)


class Ticket:
    """One admitted request: the streams whose usage it reports when it ends."""

    def __init__(self, tenant: Tenant | None, request_id: str, model_id: str, num_prompt_tokens: int,
                 num_tokens: int, num_samples: int = 1):
        self.tenant = tenant
        self.request_id = request_id
        self.model_id = model_id
        self.num_estimated_prompt_tokens = num_prompt_tokens
        self.num_estimated_tokens = num_tokens  # charged at admission
        self.num_samples = max(1, num_samples)  # streams come prompt by prompt, n samples each
        self.streams: list = []  # gateway.stream.RequestStream

    def watch(self, stream) -> None:
        self.streams.append(stream)


class TenantGate:
    def __init__(self, config: GatewayConfig, registry):
        self.path = config.tenants_file
        self.api_key = config.api_key
        self.refresh_s = config.tenants_refresh_s
        self.tenants = Tenants(())
        self.metrics = TenantMetrics(registry) if self.path else None
        self.limiter: Limiter | None = None
        self.redis = None
        self._file_text = ""  # the last good file's records (shared form)
        self._file_digest = ""  # of the last file read, good or bad
        self._shared_text = ""  # the records in force
        self._tickets: dict[str, Ticket] = {}  # open requests (their leases are renewed)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def is_on(self) -> bool:
        return bool(self.path)

    # -- life ---------------------------------------------------------------------------------
    async def start(self, redis) -> None:
        if not self.is_on:
            return
        if self.api_key:
            log.warning("tenants file given: C2C_API_KEY is ignored, tenants' keys authenticate")
        self.redis, self.limiter = redis, Limiter(redis)
        raw = self._read_bytes()
        self._file_digest = hashlib.sha256(raw).hexdigest()
        self._file_text = tenants.parse(raw.decode("utf-8", "replace"), self.path, _is_yaml(self.path)).to_json()
        await self.redis.set(keys.tenants(), self._file_text)
        self._adopt(self._file_text)
        natsutil.spawn(self._refresh_loop(), self._tasks, "tenants refresh")
        natsutil.spawn(self._renew_loop(), self._tasks, "tenant lease renewal")
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    async def stop(self) -> None:
        if self.is_on:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await natsutil.shutdown(self._tasks, None, None)

    def reload(self) -> None:
        """Re-read the file now (SIGHUP)."""
        self._wake.set()

    def _read_bytes(self) -> bytes:
        try:
            return Path(self.path).expanduser().read_bytes()
        except OSError as exc:
            raise C2CError(f"tenants file {self.path}: cannot read it ({exc})") from None

    def _adopt(self, text: str) -> None:
        self.tenants = Tenants.from_json(text)
        self._shared_text = text
        log.info("tenants in force: %s", ", ".join(
            f"{t.name} ({len(t.models)} private models, limits {t.limits.as_dict()})" for t in self.tenants.tenants)
            or "none")

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.refresh()
            except natsutil.IO_ERRORS as exc:
                log.warning("tenants refresh failed (Redis), keeping the records in force: %s", exc)

    async def refresh(self) -> None:
        """Publish our file if it changed and is valid; adopt what Redis holds."""
        await self._check_file()
        shared = await self.redis.get(keys.tenants())
        if shared is None:  # flushed, or a Valkey without its file: put the records in force back
            shared = self._shared_text or self._file_text
            await self.redis.set(keys.tenants(), shared)
        if shared != self._shared_text:
            try:
                self._adopt(shared)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("tenants record in Redis is malformed (%s); keeping the records in force", exc)

    async def _check_file(self) -> None:
        try:
            raw = self._read_bytes()
        except C2CError as exc:
            log.error("%s; keeping the records in force", exc)
            return
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._file_digest:
            return
        self._file_digest = digest
        try:
            text = tenants.parse(raw.decode("utf-8", "replace"), self.path, _is_yaml(self.path)).to_json()
        except C2CError as exc:
            log.error("tenants file changed but is invalid, keeping the records in force: %s", exc)
            return
        self._file_text = text
        await self.redis.set(keys.tenants(), text)
        log.info("tenants file %s reloaded and published", self.path)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            tenant_to_ids: dict[str, list[str]] = {}
            for ticket in list(self._tickets.values()):
                tenant_to_ids.setdefault(ticket.tenant.name, []).append(ticket.request_id)
            try:
                await self.limiter.renew(tenant_to_ids)
            except natsutil.IO_ERRORS as exc:
                log.warning("could not renew concurrency leases: %s", exc)

    # -- who and what -------------------------------------------------------------------------
    def authenticate(self, authorization: str) -> Tenant | None:
        """The caller's tenant (None when tenants are off); raises 401."""
        if not self.is_on:
            if self.api_key and authorization != f"Bearer {self.api_key}":
                raise C2CError("Incorrect API key provided", code=ErrorCode.UNAUTHORIZED)
            return None
        if not authorization.startswith("Bearer ") or not authorization[7:].strip():
            raise C2CError("You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                           code=ErrorCode.UNAUTHORIZED)
        tenant = self.tenants.find(authorization[7:].strip())
        if tenant is None:
            raise C2CError("Incorrect API key provided", code=ErrorCode.UNAUTHORIZED)
        return tenant

    def is_visible(self, entry: ModelEntry, tenant: Tenant | None) -> bool:
        return tenant is None or tenants.is_visible(entry.model_id, entry.owner, self.tenants, tenant)

    def owner(self, entry: ModelEntry) -> str:
        return tenants.effective_owner(entry.model_id, entry.owner, self.tenants) if self.is_on else entry.owner

    # -- admission ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def admit(self, tenant: Tenant | None, req) -> AsyncIterator[Ticket]:
        """Charge the tenant's limits (429 over one) and hold a concurrency slot until the
        block exits, however it exits; then correct the token charge and add the usage."""
        num_prompt = math.ceil(req.submit.num_prompt_chars / _CHARS_PER_TOKEN)
        num_samples = getattr(req, "n", 1) or 1
        ticket = Ticket(tenant, req.request_id, req.model, num_prompt, num_prompt + num_samples * req.submit.max_tokens,
                        num_samples)
        if tenant is None:
            yield ticket
            return
        try:
            refusal = await self.limiter.admit(tenant, req.request_id, ticket.num_estimated_tokens)
        except natsutil.IO_ERRORS as exc:
            raise NoCapacity(f"the rate limiter is unavailable (Redis): {exc}") from None
        if refusal is not None:
            self._refused(tenant, ticket, refusal)
        self._tickets[req.request_id] = ticket
        self.metrics.in_flight.labels(tenant.name).inc()
        try:
            yield ticket
        finally:
            self._tickets.pop(req.request_id, None)
            self.metrics.in_flight.labels(tenant.name).dec()
            # shielded: a client that went away cancels the handler, never the release
            await asyncio.shield(natsutil.spawn(self._finish(ticket), self._tasks, "tenant release"))

    def _refused(self, tenant: Tenant, ticket: Ticket, refusal: Refusal):
        self.metrics.rate_limited.labels(tenant.name, refusal.limit).inc()
        self.metrics.requests.labels(tenant.name, ticket.model_id, "rate_limited").inc()
        limit = getattr(tenant.limits, refusal.limit)
        where = f"Rate limit reached for {ticket.model_id} for tenant {tenant.name}"
        retry = f"Please try again in {refusal.retry_after_s}s."
        if refusal.limit == "requests_per_minute":
            raise RateLimited(f"{where} on requests per min (RPM): Limit {limit}, Used {refusal.num_used}, "
                              f"Requested 1. {retry}", refusal.retry_after_s, "requests")
        if refusal.limit == "tokens_per_minute":
            raise RateLimited(f"{where} on tokens per min (TPM): Limit {limit}, Used {refusal.num_used}, "
                              f"Requested {ticket.num_estimated_tokens}. {retry}", refusal.retry_after_s, "tokens")
        raise RateLimited(f"{where} on concurrent requests: Limit {limit}, In flight {refusal.num_used}. "
                          f"{retry}", refusal.retry_after_s, "requests")

    async def _finish(self, ticket: Ticket) -> None:
        tenant, m = ticket.tenant, self.metrics
        num_prompt = num_completion = num_actual = 0
        outcome = "aborted"
        for i, stream in enumerate(ticket.streams):
            if stream.finish_reason in _DONE:  # a prompt counts once, not once per sample (as its usage)
                num_prompt += stream.num_prompt_tokens if i % ticket.num_samples == 0 else 0
                num_completion += stream.num_generated_tokens
                num_actual += stream.num_prompt_tokens + stream.num_generated_tokens
                outcome = "ok" if outcome != "error" else outcome
            elif stream.finish_reason == FinishReason.ERROR:
                num_actual += stream.num_prompt_tokens + stream.num_generated_tokens
                outcome = "error"
            else:  # the client went away or it timed out: the prompt was likely computed
                num_actual += ticket.num_estimated_prompt_tokens + len(stream.token_ids)
        m.requests.labels(tenant.name, ticket.model_id, outcome).inc()
        m.prompt_tokens.labels(tenant.name, ticket.model_id).inc(num_prompt)
        m.generation_tokens.labels(tenant.name, ticket.model_id).inc(num_completion)
        try:
            await self.limiter.finish(tenant, ticket.request_id, ticket.model_id,
                                      ticket.num_estimated_tokens - num_actual, num_prompt, num_completion,
                                      is_counted=outcome == "ok")
        except natsutil.IO_ERRORS as exc:
            log.warning("[req=%s] could not release tenant %s's slot (its lease expires): %s",
                        ticket.request_id, tenant.name, exc)

    # -- GET /v1/usage ----------------------------------------------------------------------------
    async def usage(self, tenant: Tenant) -> dict:
        try:
            model_to_usage = await self.limiter.usage(tenant.name)
            num_in_flight = await self.limiter.in_flight(tenant.name)
        except natsutil.IO_ERRORS as exc:
            raise NoCapacity(f"usage unavailable: Redis did not answer ({exc})") from None
        data = [{"model": model_id, **row} for model_id, row in sorted(model_to_usage.items())]
        total = {k: sum(row[k] for row in data) for k in ("requests", "prompt_tokens", "completion_tokens",
                                                          "total_tokens")}
        return {"object": "usage", "tenant": tenant.name, "data": data, "total": total,
                "limits": tenant.limits.as_dict(), "in_flight": num_in_flight}


def _is_yaml(path: str) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")
