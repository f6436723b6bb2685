"""Prometheus metrics of the gateway (one registry per app, so tests can build many).

Names map one to one onto vLLM's (`vllm:` becomes `c2c_`): time_to_first_token_seconds,
inter_token_latency_seconds, e2e_request_latency_seconds, prompt_tokens_total,
generation_tokens_total, request_prompt_tokens, request_generation_tokens (histograms per
finished request), request_params_n and kv_cache_usage_perc (a fraction in [0, 1], as vLLM's despite the
name: per worker, the fullest model's KV cache, from the workers' telemetry).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# vLLM's build_1_2_5_buckets up to the largest context windows served
_TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5)) + (1_000_000,)
KV_STALE_S = 10.0  # a worker silent this long drops out of the KV gauge


class KvUsage:
    """c2c_kv_cache_usage_perc{worker}: the last telemetry of each live worker (a collector,
    so workers that went away drop out)."""

    def __init__(self) -> None:
        self.used_frac: dict[str, tuple[float, float]] = {}  # worker -> (used fraction, monotonic time)

    def observe(self, worker_id: str, kv_free_frac: float) -> None:
        self.used_frac[worker_id] = (min(1.0, max(0.0, 1.0 - kv_free_frac)), time.monotonic())

    def collect(self):
        family = GaugeMetricFamily("c2c_kv_cache_usage_perc", "KV cache usage, a fraction in [0, 1] "
                                   "(vllm:kv_cache_usage_perc): the worker's fullest model", labels=("worker",))
        now = time.monotonic()
        for worker_id, (used, seen_s) in sorted(self.used_frac.items()):
            if now - seen_s < KV_STALE_S:
                family.add_metric((worker_id,), used)
        yield family


class KvTiers:
    """KV rotation between a worker's KV cache and its host tier, from its telemetry:
    c2c_kv_blocks{worker,tier} (blocks in use), c2c_kv_swaps_total{worker,direction},
    c2c_kv_swap_bytes_total{worker,direction}, c2c_kv_rotation_stalls_total{worker}."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[object, float]] = {}  # worker -> (WorkerState, monotonic time)

    def observe(self, state) -> None:
        self.states[state.worker_id] = (state, time.monotonic())

    def collect(self):
        blocks = GaugeMetricFamily("c2c_kv_blocks", "KV blocks in use per tier (device: the KV cache; "
                                   "host: sequences rotated out)", labels=("worker", "tier"))
        swaps = CounterMetricFamily("c2c_kv_swaps", "KV rotations: copies out to the host tier and back in",
                                    labels=("worker", "direction"))
        moved = CounterMetricFamily("c2c_kv_swap_bytes", "KV bytes copied between the tiers",
                                    labels=("worker", "direction"))
        stalls = CounterMetricFamily("c2c_kv_rotation_stalls", "rotated sequences back later than their "
                                     "TPOT slack allowed", labels=("worker",))
        now = time.monotonic()
        for worker_id, (s, seen_s) in sorted(self.states.items()):
            if now - seen_s >= KV_STALE_S:
                continue
            blocks.add_metric((worker_id, "device"), s.kv_device_blocks_used)
            blocks.add_metric((worker_id, "host"), s.kv_host_blocks_used)
            for direction, num, num_bytes in (("out", s.kv_swaps_out, s.kv_swap_out_bytes),
                                              ("in", s.kv_swaps_in, s.kv_swap_in_bytes)):
                swaps.add_metric((worker_id, direction), num)
                moved.add_metric((worker_id, direction), num_bytes)
            stalls.add_metric((worker_id,), s.kv_rotation_stalls)
        yield from (blocks, swaps, moved, stalls)


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
        self.tokens = Counter("c2c_generation_tokens_total", "generated tokens", labels, registry=self.registry)
        self.migrations = Counter("c2c_migrations_total", "streams that moved to another worker with their KV "
                                  "(live migration)", ("model",), registry=self.registry)
        self.prompt_tokens = Counter("c2c_prompt_tokens_total", "prompt tokens of finished requests",
                                     labels, registry=self.registry)
        self.request_prompt_tokens = Histogram("c2c_request_prompt_tokens", "prompt tokens per finished request",
                                               ("model",), buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.request_generation_tokens = Histogram("c2c_request_generation_tokens",
                                                   "generated tokens per finished request", ("model",),
                                                   buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.request_params_n = Histogram("c2c_request_params_n", "the n parameter of finished requests",
                                          ("model",), buckets=(1, 2, 5, 10, 20, 50, 128), registry=self.registry)
        self.kv_usage = KvUsage()
        self.registry.register(self.kv_usage)
        self.kv_tiers = KvTiers()
        self.registry.register(self.kv_tiers)

        self._children: dict[tuple, object] = {}

    def child(self, metric, *label_values: str):
        """metric.labels(*label_values), cached (labels() validates and locks on every call)."""
        key = (id(metric), *label_values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*label_values)
        return found

    def observe_finished(self, model_id: str, worker_id: str, num_prompt_tokens: int,
                         num_generated_tokens: int) -> None:
        """One request that finished well: its prompt and output token counts."""
        self.child(self.prompt_tokens, model_id, worker_id).inc(num_prompt_tokens)
        self.child(self.request_prompt_tokens, model_id).observe(num_prompt_tokens)
        self.child(self.request_generation_tokens, model_id).observe(num_generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
