"""One request's state inside the engine (pure: no torch).

A sequence's tokens are `token_ids` (prompt then generated). `num_computed_tokens` of them
are in the KV cache. Each step the scheduler gives it `num_tokens - num_computed_tokens`
tokens at most (a prefill chunk, or the one new token in decode); when a step brings the
KV up to `num_tokens`, the model's logits for the last token are sampled and the new token
appended. Preemption by recompute sets `num_computed_tokens` back to 0; rotation moves the
KV to the host tier and back and keeps it (`worker/rotation.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from services.errors import InvalidRequest


class SequenceStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    ROTATING_OUT = 3  # its KV is being copied to the host tier (worker/rotation.py)
    ROTATED_OUT = 4   # its KV is in the host tier only
    ROTATING_IN = 5   # its KV is being copied back


@dataclass(eq=False)
class Sequence:
    request_id: str
    model_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: Any  # engine.SamplingParams (kept opaque here)
    arrival_s: float
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.2
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_preemptions: int = 0  # times its KV left its blocks (recompute, or rotation to the host tier)
    finish_reason: str | None = None
    tenant: str = ""  # the caller's tenant: the scheduler shares batch slots fairly between tenants

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than the newest token is missing from the KV cache."""
        return len(self.token_ids) - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


def check_times(**times_s) -> None:
    """A request's arrival time and SLOs, when given, are finite numbers (SLOs > 0):
    a NaN would poison the scheduler's deadline order for every request. InvalidRequest."""
    for name, value in times_s.items():
        if value is None:
            continue
        is_slo = name != "arrival_s"
        if not is_finite_number(value) or (is_slo and value <= 0):
            raise InvalidRequest(f"{name} must be a finite number{' > 0' if is_slo else ''}, got {value!r}",
                                 param=name)


def is_finite_number(x) -> bool:
    """A finite float, or an int a float can hold (not a bool)."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False
