"""The engine's runtime knobs: one type, one set of defaults, from the controller's law
through `ControlUpdate` to the worker's scheduler (pure, no dependencies)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Knobs:
    chunk_size: int = 256  # prefill tokens per step of one sequence
    max_num_seqs: int = 16  # batch cap
    max_num_batched_tokens: int = 512  # token budget of one step
    decode_threshold: int = 16  # batches up to this many rows take the GEMV (decode) path
    rho_cap: float = 1.0  # the most of a model's weights the slice serves from its cache


DEFAULT_KNOBS = Knobs()

__all__ = ["DEFAULT_KNOBS", "Knobs"]
