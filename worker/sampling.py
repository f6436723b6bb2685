"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators.

A request with a seed gets its own `torch.Generator`, so its samples depend only on its
own logits, never on what else shares the batch. Rows with a temperature below
`GREEDY_BELOW_TEMPERATURE` are greedy (as in vLLM: logits / 1e-40 overflow to inf and
softmax turns them into NaN). A row that cannot be sampled (say, logits all NaN) gets its
exception in place of a token id: that request fails, the batch's others go on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch

from services.errors import InvalidRequest
from worker.sequence import is_finite_number

GREEDY_BELOW_TEMPERATURE = 1e-5
_SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed accepts


class SamplingError(ValueError):
    """One request's logits row could not be sampled."""


class Sampler:
    """Samples one token per logits row; keeps each seeded request's generator."""

    def __init__(self):
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, params: Seq, request_ids: Seq[str]) -> list[int | Exception]:
        """logits [S, V] fp32, params[i] has temperature/top_k/top_p/seed -> S token ids,
        or for a row that failed its exception (that request alone fails)."""
        max_logits, greedy_ids = logits.max(dim=-1)  # [S], [S]; NaN or +inf in a row shows in its max
        is_greedy = [is_greedy_temperature(p.temperature) for p in params]
        if all(is_greedy) and bool(torch.isfinite(max_logits).all()):
            return greedy_ids.tolist()
        is_row_finite = torch.isfinite(max_logits).tolist()
        out: list[int | Exception] = []
        for row, request_id in enumerate(request_ids):
            try:
                out.append(self._sample_one(logits[row], params[row], request_id, is_greedy[row],
                                            is_row_finite[row], int(greedy_ids[row])))
            except Exception as exc:  # one request's bad row must not fail the batch
                out.append(exc)
        return out

    def _sample_one(self, row: torch.Tensor, p, request_id: str, is_greedy: bool,
                    is_finite: bool, greedy_id: int) -> int:
        if not is_finite:
            row = finite_logits(row)
            greedy_id = int(row.argmax())
        if is_greedy:
            return greedy_id
        return sample_row(row, p.temperature, p.top_k, p.top_p, self._generator(request_id, p.seed))

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None  # torch's default generator
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(int(seed))
            self._generators[request_id] = gen
        return gen


def is_greedy_temperature(temperature: float) -> bool:
    return temperature < GREEDY_BELOW_TEMPERATURE


def greedy(logits: torch.Tensor) -> list[int]:
    """logits [S, V] -> argmax ids."""
    return logits.argmax(dim=-1).tolist()


def finite_logits(row: torch.Tensor) -> torch.Tensor:
    """row [V] with NaN as -inf and +inf as the largest float; SamplingError if nothing is left."""
    row = torch.nan_to_num(row.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                           neginf=float("-inf"))  # [V]
    if not math.isfinite(float(row.max())):
        raise SamplingError("the model's logits for this request are all NaN or -inf")
    return row


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """logits [V], finite max -> one token id from softmax(logits / T), restricted by top-k
    then top-p (which always keeps the most likely token)."""
    if is_greedy_temperature(temperature):
        return int(logits.argmax())
    logits = logits.float()
    # shifted so the max is 0: dividing by a small T can then only underflow to -inf, never
    # overflow to inf, and softmax always has one term exp(0) = 1
    scaled = (logits - logits.max()) / temperature  # [V]
    vocab_size = scaled.shape[0]
    if 0 < top_k < vocab_size:
        kth_value = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(descending=True)  # [V], [V]
        is_outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # [V] mass before each token
        is_outside[0] = False  # the most likely token stays, however small top_p is
        choice = torch.multinomial(sorted_probs.masked_fill(is_outside, 0.0), 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_params(p) -> None:
    """engine.SamplingParams check: InvalidRequest naming the parameter for a value out of range."""
    def bad(param, why):
        raise InvalidRequest(f"{param} {why}", param=param)

    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        bad("max_tokens", f"must be an integer >= 1, got {p.max_tokens!r}")
    if not is_finite_number(p.temperature) or p.temperature < 0:
        bad("temperature", f"must be a number >= 0, got {p.temperature!r}")
    if not is_finite_number(p.top_p) or not 0 < p.top_p <= 1:
        bad("top_p", f"must be in (0, 1], got {p.top_p!r}")
    if not _is_int(p.top_k) or p.top_k < 0:
        bad("top_k", f"must be an integer >= 0, got {p.top_k!r}")
    if p.seed is not None and (not _is_int(p.seed) or not _SEED_RANGE[0] <= p.seed < _SEED_RANGE[1]):
        bad("seed", f"must be an integer in [-2**63, 2**64), got {p.seed!r}")
    if isinstance(p.stop, str):
        p.stop = [p.stop]
    if not isinstance(p.stop, list | tuple) or not all(isinstance(s, str) and s for s in p.stop):
        bad("stop", "must be a list of non-empty strings")
    if not isinstance(p.stop_token_ids, list | tuple) or not all(_is_int(t) for t in p.stop_token_ids):
        bad("stop_token_ids", "must be a list of integers")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
