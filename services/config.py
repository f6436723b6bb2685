"""One frozen config object per service, from flags and `C2C_*` environment variables.

Precedence: a command-line flag, else the environment variable `C2C_<FIELD>`, else the
default. `add_config_arguments(parser, Cls)` adds one `--field-name` flag per field;
`load_config(Cls, args)` builds and validates it (raises `C2CError` naming the bad
variable) and logs it once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services import slo
from services.errors import C2CError
from services.knobs import DEFAULT_KNOBS
from services.logutil import redact

log = logging.getLogger(__name__)
C = TypeVar("C")
RESIDENCY_MODES = ("host", "load", "dedicated")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class CommonConfig:
    nats_url: str = field(default="nats://127.0.0.1:4222",
                          metadata=_help("NATS server URL, or several comma-separated (a cluster)"))
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=_help("Redis URL"))
    node: str = field(default_factory=socket.gethostname, metadata=_help("node name"))
    connect_timeout_s: float = field(default=20.0, metadata=_help("retry NATS/Redis this long"))
    model_roots: str = field(default="", metadata=_help(
        "comma-separated folders that catalog paths must lie under (empty: no confinement)"))
    ttft_slo_ms: float = field(default=slo.DEFAULT_TTFT_SLO_MS, metadata=_help(
        "TTFT SLO of a standard request to a model without its own (services/slo.py), in ms"))
    tpot_slo_ms: float = field(default=slo.DEFAULT_TPOT_SLO_MS, metadata=_help(
        "time per output token SLO of a standard request, in ms"))

    def validate(self) -> None:
        _check(self.ttft_slo_ms > 0 and self.tpot_slo_ms > 0, "ttft_slo_ms", "SLOs must be > 0")
        _check(all(u.strip().startswith(("nats://", "tls://")) for u in self.nats_url.split(",")),
               "nats_url", "must be nats://HOST:PORT (or several, comma-separated)")
        _check(self.redis_url.startswith(("redis://", "rediss://", "unix://")), "redis_url", "must be redis://HOST:PORT/DB")
        _check(self.connect_timeout_s > 0, "connect_timeout_s", "must be > 0")


@dataclass(frozen=True)
class GatewayConfig(CommonConfig):
    host: str = field(default="127.0.0.1", metadata=_help("HTTP bind address"))
    port: int = field(default=8000, metadata=_help("HTTP port"))
    api_key: str = field(default="", metadata=_help("require this Bearer key (empty: no auth)"))
    first_chunk_timeout_s: float = field(default=60.0, metadata=_help("504 if no token within this (cold starts included)"))
    chunk_timeout_s: float = field(default=30.0, metadata=_help("504 if the stream stalls this long"))
    retry_after_s: int = field(default=1, metadata=_help("Retry-After on 503"))
    catalog_refresh_s: float = field(default=2.0, metadata=_help("reload the model catalog this often"))
    models_dir: str = field(default="", metadata=_help("register every checkpoint folder under this at start"))
    request_timeout_s: float = field(default=600.0, metadata=_help("overall deadline of one request (504 after it)"))
    tenants_file: str = field(default="", metadata=_help(
        "tenants (keys, private models, limits), JSON or YAML; re-read when it changes and on SIGHUP "
        "(empty: one optional api_key serves all; docs/tenants.md)"))
    tenants_refresh_s: float = field(default=1.0, metadata=_help("re-read the tenants file and records this often"))

    def validate(self) -> None:
        super().validate()
        _check(0 <= self.port < 65536, "port", "must be 0..65535")
        _check(self.tenants_refresh_s > 0, "tenants_refresh_s", "must be > 0")
        _check(self.first_chunk_timeout_s > 0 and self.chunk_timeout_s > 0, "chunk_timeout_s", "must be > 0")
        _check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")


@dataclass(frozen=True)
class PlacerConfig(CommonConfig):
    worker_expiry_s: float = field(default=3.0, metadata=_help("declare a worker dead after this without a heartbeat"))
    max_queue_wait_s: float = field(default=30.0, metadata=_help(
        "refuse a request (503) when every slice that may serve it has more queued prefill than this (0: never)"))
    stall_timeout_s: float = field(default=60.0, metadata=_help(
        "declare a worker stalled when its engine made no step for this long while it had work"))
    request_ttl_s: int = field(default=600, metadata=_help("TTL of c2c:req:<id> assignment records"))
    prewarm_interval_s: float = field(default=5.0, metadata=_help("forecast-driven prewarm period (0: off)"))
    prewarm_budget_bytes: int = field(default=4 << 30, metadata=_help("prewarmed bytes per slice when its KV is idle"))
    rebalance_interval_s: float = field(default=0.0, metadata=_help(
        "move a running request from a hot slice to an idle one (live migration) this often (0: off)"))

    def validate(self) -> None:
        super().validate()
        _check(self.worker_expiry_s > 0, "worker_expiry_s", "must be > 0")
        _check(self.stall_timeout_s > 0, "stall_timeout_s", "must be > 0")
        _check(self.max_queue_wait_s >= 0, "max_queue_wait_s", "must be >= 0")


@dataclass(frozen=True)
class ControllerConfig(CommonConfig):
    pass


@dataclass(frozen=True)
class WorkerConfig(CommonConfig):
    worker_id: str = field(default="", metadata=_help("worker id (default: <node>-<slice>)"))
    slice_index: int = field(default=-1, metadata=_help("run this slice only (-1: one process per slice)"))
    num_slices: int = field(default=0, metadata=_help("CPU: split the cores into this many slices (0: auto)"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda"))
    residency: str = field(default="host", metadata=_help("host | load | dedicated"))
    worker_models: str = field(default="", metadata=_help("dedicated: comma-separated model ids pinned here"))
    max_num_seqs: int = field(default=DEFAULT_KNOBS.max_num_seqs, metadata=_help("batch cap"))
    max_num_batched_tokens: int = field(default=DEFAULT_KNOBS.max_num_batched_tokens,
                                        metadata=_help("token budget per step"))
    chunk_size: int = field(default=DEFAULT_KNOBS.chunk_size, metadata=_help("prefill chunk"))
    kv_cache_bytes: int = field(default=256 << 20, metadata=_help("KV cache bytes per model"))
    load_budget_bytes: int = field(default=0, metadata=_help("residency=load: private weight bytes (0: no limit)"))
    num_threads: int = field(default=0, metadata=_help("torch threads (0: every core of the slice)"))
    telemetry_interval_s: float = field(default=0.1, metadata=_help("telemetry period"))
    heartbeat_ttl_s: int = field(default=3, metadata=_help("heartbeat key TTL"))
    drain_timeout_s: float = field(default=5.0, metadata=_help(
        "on SIGTERM: time to move running requests to other workers with their KV (0: hand them back)"))
    host_kv_bytes: int = field(default=512 << 20, metadata=_help(
        "host KV tier per model: SLO-aware rotation of KV to host memory (0: recompute only)"))

    def validate(self) -> None:
        super().validate()
        _check(self.residency in RESIDENCY_MODES, "residency", f"must be one of {', '.join(RESIDENCY_MODES)}")
        _check(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        _check(self.max_num_seqs > 0 and self.max_num_batched_tokens > 0, "max_num_seqs", "must be > 0")
        _check(self.telemetry_interval_s > 0 and self.heartbeat_ttl_s > 0, "heartbeat_ttl_s", "must be > 0")
        _check(self.num_slices >= 0, "num_slices", "must be >= 0")
        _check(self.host_kv_bytes >= 0, "host_kv_bytes", "must be >= 0")

    @property
    def pinned_models(self) -> list[str]:
        return [m.strip() for m in self.worker_models.split(",") if m.strip()]


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise C2CError(f"invalid config C2C_{name.upper()} / --{name.replace('_', '-')}: {message}")


def _field_type(f: dataclasses.Field) -> type:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return type(default)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` flag per config field; default None so env vars still apply."""
    for f in dataclasses.fields(cls):
        env = f"C2C_{f.name.upper()}"
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, default=None, type=_field_type(f),
            help=f"{f.metadata.get('help', '')} (env {env})",
        )


def _convert(raw: str, kind: type, name: str) -> Any:
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError as exc:
        raise C2CError(f"invalid config C2C_{name.upper()}={raw!r}: expected {kind.__name__}") from exc


def load_config(cls: type[C], args: argparse.Namespace | None = None,
                environ: dict[str, str] | None = None, log_it: bool = True) -> C:
    """Build `cls` from flags, then `C2C_*` env vars, then defaults; validate; log once."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        flag = getattr(args, f.name, None) if args is not None else None
        env = environ.get(f"C2C_{f.name.upper()}")
        if flag is not None:
            values[f.name] = flag
        elif env is not None and env != "":
            values[f.name] = _convert(env, _field_type(f), f.name)
    config = cls(**values)
    config.validate()
    if log_it:
        shown = {k: ("***" if k == "api_key" and v else redact(v) if k.endswith("_url") else v)
                 for k, v in dataclasses.asdict(config).items()}
        log.info("%s %s", cls.__name__, shown)
    return config
