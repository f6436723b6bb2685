"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators.

A request with a seed gets its own `torch.Generator`, so its samples depend only on its
own logits, never on what else shares the batch. Rows with temperature 0 are greedy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch

from services.errors import InvalidRequest


class Sampler:
    """Samples one token per logits row; keeps each seeded request's generator."""

    def __init__(self):
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, params: Seq, request_ids: Seq[str]) -> list[int]:
        """logits [S, V] fp32, params[i] has temperature/top_k/top_p/seed -> S token ids."""
        greedy_ids = logits.argmax(dim=-1).tolist()  # [S]; cheap, and the answer for T=0 rows
        if all(p.temperature == 0 for p in params):
            return greedy_ids
        out = []
        for row, (p, request_id, greedy_id) in enumerate(zip(params, request_ids, greedy_ids, strict=True)):
            if p.temperature == 0:
                out.append(greedy_id)
                continue
            gen = self._generator(request_id, p.seed)
            out.append(sample_row(logits[row], p.temperature, p.top_k, p.top_p, gen))
        return out

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


def greedy(logits: torch.Tensor) -> list[int]:
    """logits [S, V] -> argmax ids."""
    return logits.argmax(dim=-1).tolist()


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """logits [V] -> one token id from softmax(logits / T), restricted by top-k then top-p."""
    scaled = logits.float() / temperature  # [V]
    vocab_size = scaled.shape[0]
    if 0 < top_k < vocab_size:
        kth_value = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(descending=True)  # [V], [V]
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # keeps >= 1 token
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_params(p) -> None:
    """engine.SamplingParams check: InvalidRequest naming the parameter for a value out of range."""
    def bad(param, why):
        raise InvalidRequest(f"{param} {why}", param=param)

    if not isinstance(p.max_tokens, int) or isinstance(p.max_tokens, bool) or p.max_tokens < 1:
        bad("max_tokens", f"must be an integer >= 1, got {p.max_tokens!r}")
    if not isinstance(p.temperature, int | float) or not math.isfinite(p.temperature) or p.temperature < 0:
        bad("temperature", f"must be a number >= 0, got {p.temperature!r}")
    if not isinstance(p.top_p, int | float) or not 0 < p.top_p <= 1:
        bad("top_p", f"must be in (0, 1], got {p.top_p!r}")
    if not isinstance(p.top_k, int) or p.top_k < 0:
        bad("top_k", f"must be an integer >= 0, got {p.top_k!r}")
    if p.seed is not None and not isinstance(p.seed, int):
        bad("seed", f"must be an integer, got {p.seed!r}")
    if isinstance(p.stop, str):
        p.stop = [p.stop]
    if not all(isinstance(s, str) and s for s in p.stop):
        bad("stop", "must be a list of non-empty strings")
    if not all(isinstance(t, int) for t in p.stop_token_ids):
        bad("stop_token_ids", "must be a list of integers")
