"""KV rotation policy: which running sequences move their KV cache to the host tier and
back, by SLO slack (pure module, beside `step_policy`; RotaSched in SuperInfer).

A decoding sequence keeps its TPOT SLO on average when its n-th generated token (the first
is token 0) comes by `first_token_s + n * tpot_slo_s`; the time left until then is its
*slack*. A sequence that decoded faster than its SLO has slack to spare and can wait
outside the KV cache for a while without missing it.

- Rotate out: when a waiting sequence cannot start for lack of KV blocks, and waiting
  for running sequences to finish would make it miss its TTFT SLO
  (`ttft_at_risk`), the running decodes with the most slack leave (`pick_rotate_out`),
  each only if it can afford `out_min_slack_steps` steps away, until the blocks it needs
  are covered; when the host tier holds only some of that set, those that fit rotate and
  the rest are recomputed (`split_rotate_out`).
- Rotate in: a rotated sequence comes back before its slack runs out (below
  `in_margin_steps` steps: the copy back and its next step must fit), least slack first,
  as soon as free blocks allow; earlier when the free blocks are more than the waiting
  sequences need (`pick_rotate_in`).

Times are estimated from the engine's step time `step_s` (one decode token per step).
Used by `worker/rotation.py` (engine); plain data in and out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RotationConfig:
    out_min_slack_steps: float = 8.0  # a sequence rotated out must afford this many steps away
    in_margin_steps: float = 4.0      # rotate back in when less slack than this many steps is left


@dataclass
class DecodeView:
    """A decoding sequence, running or rotated out."""

    request_id: str
    num_blocks: int            # KV blocks it holds (or needs back, plus one to grow)
    slack_s: float             # `tpot_slack_s`
    num_remaining_tokens: int  # tokens it may still generate (max_tokens left)


@dataclass
class WaitingView:
    """A sequence that has not started (or was preempted) and needs KV blocks to run."""

    request_id: str
    num_blocks_needed: int     # blocks beyond the free ones that its prefill needs
    ttft_deadline_s: float     # arrival + TTFT SLO
    num_prefill_steps: int     # steps its prefill takes once it runs


def tpot_slack_s(first_token_s: float, num_generated: int, tpot_slo_s: float, now_s: float) -> float:
    """How long a decoding sequence may wait for its next token and still keep its mean
    time per output token within `tpot_slo_s`."""
    return first_token_s + num_generated * tpot_slo_s - now_s


def ttft_at_risk(waiting: WaitingView, running: list[DecodeView], step_s: float, now_s: float) -> bool:
    """Would `waiting` miss its TTFT SLO if it waited for running sequences to finish and
    free its blocks? False when it needs no blocks, or is already past saving."""
    if waiting.num_blocks_needed <= 0:
        return False
    slack_s = waiting.ttft_deadline_s - now_s - waiting.num_prefill_steps * step_s
    if slack_s < 0:
        return False
    num_freed = 0
    for seq in sorted(running, key=lambda s: s.num_remaining_tokens):
        num_freed += seq.num_blocks
        if num_freed >= waiting.num_blocks_needed:
            return seq.num_remaining_tokens * step_s > slack_s
    return True


def pick_rotate_out(running: list[DecodeView], num_blocks_needed: int, num_free_host_blocks: int,
                    step_s: float, config: RotationConfig = RotationConfig()) -> list[DecodeView]:
    """The decodes to rotate out, most slack first, that together free `num_blocks_needed`
    blocks and fit the host tier's free blocks; [] when no such set exists."""
    min_slack_s = config.out_min_slack_steps * step_s
    chosen, num_freed, num_host = [], 0, num_free_host_blocks
    for seq in sorted(running, key=lambda s: s.slack_s, reverse=True):
        if num_freed >= num_blocks_needed or seq.slack_s < min_slack_s:
            break
        if seq.num_blocks <= num_host:
            chosen.append(seq)
            num_freed += seq.num_blocks
            num_host -= seq.num_blocks
    return chosen if num_freed >= num_blocks_needed else []


def split_rotate_out(victims: list[DecodeView], num_free_host_blocks: int
                     ) -> tuple[list[DecodeView], list[DecodeView]]:
    """Split a victim set (from `pick_rotate_out` with no host limit) into those the host
    tier's free blocks hold, in order (rotated), and the rest (recomputed)."""
    rotate, recompute = [], []
    for seq in victims:
        if seq.num_blocks <= num_free_host_blocks:
            rotate.append(seq)
            num_free_host_blocks -= seq.num_blocks
        else:
            recompute.append(seq)
    return rotate, recompute


def pick_rotate_in(rotated: list[DecodeView], num_free_blocks: int, num_waiting_blocks: int,
                   step_s: float, config: RotationConfig = RotationConfig()) -> list[DecodeView]:
    """The rotated sequences to bring back now, least slack first: those about to run out
    of slack whenever their blocks are free; the others only with blocks to spare beyond
    the `num_waiting_blocks` that waiting sequences need."""
    margin_s = config.in_margin_steps * step_s
    chosen = []
    for seq in sorted(rotated, key=lambda s: s.slack_s):
        is_urgent = seq.slack_s < margin_s
        spare = num_free_blocks - (0 if is_urgent else num_waiting_blocks)
        if seq.num_blocks > spare:
            if is_urgent:
                break  # the most urgent first: later ones must not take its blocks
            continue
        chosen.append(seq)
        num_free_blocks -= seq.num_blocks
    return chosen


__all__ = [
    "DecodeView",
    "RotationConfig",
    "WaitingView",
    "pick_rotate_in",
    "pick_rotate_out",
    "split_rotate_out",
    "tpot_slack_s",
    "ttft_at_risk",
]
