"""Prometheus metrics per tenant (registered on the gateway's registry, gateway.metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class TenantMetrics:
    """Requests, prompt and generated tokens per tenant and model; refusals per limit."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("tenant", "model")
        self.requests = Counter("c2c_tenant_requests_total", "requests by tenant, model and outcome "
                                "(ok, error, aborted, rate_limited)", (*labels, "outcome"), registry=registry)
        self.prompt_tokens = Counter("c2c_tenant_prompt_tokens_total", "prompt tokens of finished requests",
                                     labels, registry=registry)
        self.generation_tokens = Counter("c2c_tenant_generation_tokens_total",
                                         "generated tokens of finished requests", labels, registry=registry)
        self.rate_limited = Counter("c2c_tenant_rate_limited_total", "requests refused (429) by limit",
                                    ("tenant", "limit"), registry=registry)
        self.in_flight = Gauge("c2c_tenant_requests_in_flight", "admitted requests open on this gateway",
                               ("tenant",), registry=registry)
