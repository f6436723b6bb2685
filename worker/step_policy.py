"""Worker step policy: SLO deadlines and the model chosen per engine step (pure module).

A worker may hold sequences of several models; one engine step runs one model's batch
(its weights stream once per step, shared by every sequence of that model). The policy:

- every sequence has a deadline: a prefill sequence must emit its first token by
  arrival + TTFT SLO, a decoding one its next token by last token + TPOT SLO;
- earliest deadline first across models: the model owning the most urgent sequence runs;
- switching cost: changing model costs a cold step (its tiles are not in the cache, the
  link has to ramp), so the current model keeps the step unless another model's earliest
  deadline is more than `switch_cost_s` sooner;
- anti-starvation: a model whose earliest deadline is already missed by more than
  `starvation_s` wins over the hysteresis (the most overdue first), so no model waits
  behind a busy one forever;
- fairness between tenants (weighted fair queueing on batch slots): waiting sequences are
  admitted in `fair_order`, the next one always from the tenant with the fewest running
  sequences per unit of weight, so one tenant's burst cannot hold every free slot while
  another tenant waits; `pick_victim` preempts from the tenant holding the most. With one
  tenant (or none: every sequence has tenant "") both reduce to deadline order.

Used by `worker/scheduler.py` (engine) and by the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SWITCH_COST_S = 0.02
DEFAULT_STARVATION_S = 0.5


@dataclass
class SeqView:
    request_id: str
    model_id: str
    arrival_s: float
    is_prefill: bool  # still has prompt tokens to compute
    num_generated: int
    last_token_s: float | None  # time its last token was emitted (decode)
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.2
    tenant: str = ""  # "" without tenants: everyone shares one queue


def deadline_s(seq: SeqView) -> float:
    """arrival + TTFT SLO while prefilling; last token + TPOT SLO while decoding."""
    if seq.is_prefill or seq.num_generated == 0:
        return seq.arrival_s + seq.ttft_slo_s
    last_s = seq.last_token_s if seq.last_token_s is not None else seq.arrival_s
    return last_s + seq.tpot_slo_s


def order_by_deadline(seqs: list[SeqView]) -> list[SeqView]:
    """Sequences most urgent first (stable for equal deadlines)."""
    return sorted(seqs, key=deadline_s)


def earliest_deadlines(seqs: list[SeqView]) -> dict[str, float]:
    """model_id -> earliest deadline among its sequences."""
    model_to_deadline: dict[str, float] = {}
    for seq in seqs:
        due_s = deadline_s(seq)
        if due_s < model_to_deadline.get(seq.model_id, float("inf")):
            model_to_deadline[seq.model_id] = due_s
    return model_to_deadline


def pick_model(
    seqs: list[SeqView],
    now_s: float,
    current_model: str | None,
    switch_cost_s: float = DEFAULT_SWITCH_COST_S,
    starvation_s: float = DEFAULT_STARVATION_S,
) -> str | None:
    """Which model's batch runs this step (None when there is no work)."""
    model_to_deadline = earliest_deadlines(seqs)
    if not model_to_deadline:
        return None
    best_model = min(model_to_deadline, key=lambda m: (model_to_deadline[m], m))
    starving = [m for m, due in model_to_deadline.items() if now_s - due > starvation_s]
    if starving:
        return min(starving, key=lambda m: (model_to_deadline[m], m))
    if current_model in model_to_deadline:
        if model_to_deadline[current_model] <= model_to_deadline[best_model] + switch_cost_s:
            return current_model
    return best_model


def fair_order(waiting: list[SeqView], tenant_to_num_running: dict[str, int],
               tenant_to_weight: dict[str, float] | None = None) -> list[SeqView]:
    """Waiting sequences in admission order: weighted fair queueing by tenant.

    A tenant's virtual time is (its running sequences + those already placed ahead of it in
    this order) / its weight (default 1); the next place goes to the earliest-deadline
    sequence of the tenant with the smallest virtual time (ties: the earlier deadline)."""
    weights = tenant_to_weight or {}
    tenant_to_queue: dict[str, list[SeqView]] = {}
    for seq in order_by_deadline(waiting):
        tenant_to_queue.setdefault(seq.tenant, []).append(seq)
    heads = {tenant: 0 for tenant in tenant_to_queue}
    num_placed = {tenant: tenant_to_num_running.get(tenant, 0) for tenant in tenant_to_queue}
    ordered: list[SeqView] = []
    while heads:
        def key(tenant: str) -> tuple[float, float, str]:
            head = tenant_to_queue[tenant][heads[tenant]]
            return num_placed[tenant] / weights.get(tenant, 1.0), deadline_s(head), tenant

        tenant = min(heads, key=key)
        ordered.append(tenant_to_queue[tenant][heads[tenant]])
        num_placed[tenant] += 1
        heads[tenant] += 1
        if heads[tenant] == len(tenant_to_queue[tenant]):
            del heads[tenant]
    return ordered


def pick_victim(candidates: list[SeqView], tenant_to_num_running: dict[str, int],
                tenant_to_weight: dict[str, float] | None = None) -> SeqView:
    """The running sequence to preempt when KV runs out: from the tenant holding the most
    running sequences per unit of weight, its latest deadline (ties: the later candidate)."""
    weights = tenant_to_weight or {}
    return max(reversed(candidates), key=lambda s: (tenant_to_num_running.get(s.tenant, 0) / weights.get(s.tenant, 1.0),
                                          deadline_s(s)))


def num_running_by_tenant(running: list[SeqView]) -> dict[str, int]:
    tenant_to_num: dict[str, int] = {}
    for seq in running:
        tenant_to_num[seq.tenant] = tenant_to_num.get(seq.tenant, 0) + 1
    return tenant_to_num


__all__ = [
    "DEFAULT_STARVATION_S",
    "DEFAULT_SWITCH_COST_S",
    "SeqView",
    "deadline_s",
    "earliest_deadlines",
    "fair_order",
    "num_running_by_tenant",
    "order_by_deadline",
    "pick_model",
    "pick_victim",
]
