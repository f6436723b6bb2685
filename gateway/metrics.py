"""Prometheus metrics of the gateway (one registry per app, so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class GatewayMetrics:
    """Histograms per model and worker; running/waiting gauges; cold starts and outcomes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "worker")
        self.ttft_s = Histogram("c2c_time_to_first_token_seconds", "arrival to first token",
                                labels, buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.itl_s = Histogram("c2c_inter_token_latency_seconds", "time between streamed chunks",
                               labels, buckets=_ITL_BUCKETS_S, registry=self.registry)
        self.e2e_s = Histogram("c2c_e2e_request_latency_seconds", "arrival to last token",
                               labels, buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.queue_s = Histogram("c2c_queue_time_seconds", "time waiting on the worker before running",
                                 labels, buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.running = Gauge("c2c_requests_running", "requests producing tokens", labels, registry=self.registry)
        self.waiting = Gauge("c2c_requests_waiting", "requests waiting for their first token",
                             ("model",), registry=self.registry)
        self.cold_starts = Counter("c2c_cold_starts_total", "requests that triggered a model load/map",
                                   labels, registry=self.registry)
        self.requests = Counter("c2c_requests_total", "finished requests by outcome",
                                ("model", "outcome"), registry=self.registry)
        self.redispatches = Counter("c2c_redispatches_total", "requests resubmitted after their worker died",
                                    ("model",), registry=self.registry)
        self.tokens = Counter("c2c_generated_tokens_total", "generated tokens", labels, registry=self.registry)

        self._children: dict[tuple, object] = {}

    def child(self, metric, *label_values: str):
        """metric.labels(*label_values), cached (labels() validates and locks on every call)."""
        key = (id(metric), *label_values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*label_values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
