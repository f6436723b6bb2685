"""Service-level objectives: one source for the gateway, the step policy, the placer and
the controller.

A request's TTFT and TPOT targets are its model's SLO (catalog fields `ttft_slo_ms`,
`tpot_slo_ms`; 0 = the deployment's default, `C2C_TTFT_SLO_MS` / `C2C_TPOT_SLO_MS`, which
the controller reads too) scaled by its class:

| class | TTFT | TPOT | meant for |
|---|---|---|---|
| `interactive` | x0.5 | x0.5 | chat a person watches |
| `standard` | x1 | x1 | the default |
| `batch` | x30 | x5 | offline jobs: throughput, not latency |

The class comes from the request's `slo_class` API field, else the model's catalog
`slo_class`, else `standard`. The gateway resolves it once and the request carries the
class and both targets (`SubmitRequest.slo_class/ttft_slo_ms/tpot_slo_ms`): the worker's
step policy orders sequences by those deadlines, the placer weighs its routing score by
the class, and the worker's telemetry reports the tightest targets it holds, which the
controller steers to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.errors import InvalidRequest

DEFAULT_TTFT_SLO_MS = 1000.0
DEFAULT_TPOT_SLO_MS = 200.0
SLO_CLASSES = ("interactive", "standard", "batch")
CLASS_SCALE: dict[str, tuple[float, float]] = {  # class -> (TTFT factor, TPOT factor)
    "interactive": (0.5, 0.5),
    "standard": (1.0, 1.0),
    "batch": (30.0, 5.0),
}


@dataclass(frozen=True)
class SLOTarget:
    slo_class: str
    ttft_ms: float
    tpot_ms: float


def parse_slo_class(value: Any, param: str = "slo_class") -> str | None:
    """A request's `slo_class` field: None when absent; InvalidRequest when not a class."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in SLO_CLASSES:
        raise InvalidRequest(f"'{param}' must be one of {', '.join(SLO_CLASSES)}", param=param)
    return value


def resolve(request_class: str | None, model_class: str = "", model_ttft_ms: float = 0.0,
            model_tpot_ms: float = 0.0) -> SLOTarget:
    """The class and targets of one request (see the module docstring)."""
    slo_class = request_class or (model_class if model_class in CLASS_SCALE else "standard")
    ttft_scale, tpot_scale = CLASS_SCALE[slo_class]
    ttft_ms = (model_ttft_ms if model_ttft_ms > 0 else DEFAULT_TTFT_SLO_MS) * ttft_scale
    tpot_ms = (model_tpot_ms if model_tpot_ms > 0 else DEFAULT_TPOT_SLO_MS) * tpot_scale
    return SLOTarget(slo_class, ttft_ms, tpot_ms)


def apply(submit, entry, default_ttft_ms: float = DEFAULT_TTFT_SLO_MS,
          default_tpot_ms: float = DEFAULT_TPOT_SLO_MS) -> SLOTarget:
    """Resolve a SubmitRequest's SLO against its catalog entry and the deployment's
    defaults (`C2C_TTFT_SLO_MS`, `C2C_TPOT_SLO_MS`) and write it in place
    (`submit.slo_class` holds the request's own class, or "" when it named none)."""
    request_class = submit.slo_class if submit.slo_class in CLASS_SCALE else None
    target = resolve(request_class, entry.slo_class, entry.ttft_slo_ms or default_ttft_ms,
                     entry.tpot_slo_ms or default_tpot_ms)
    submit.slo_class, submit.ttft_slo_ms, submit.tpot_slo_ms = target.slo_class, target.ttft_ms, target.tpot_ms
    return target


__all__ = ["CLASS_SCALE", "DEFAULT_TPOT_SLO_MS", "DEFAULT_TTFT_SLO_MS", "SLOTarget", "SLO_CLASSES", "apply",
           "parse_slo_class", "resolve"]
