"""Worker step policy: deadlines, earliest-deadline-first across models, switching, starvation."""

from __future__ import annotations

from worker.step_policy import (
    SeqView,
    deadline_s,
    earliest_deadlines,
    order_by_deadline,
    pick_model,
)


def prefill(rid: str, model: str, arrival_s: float, ttft_s: float = 1.0) -> SeqView:
    return SeqView(rid, model, arrival_s, True, 0, None, ttft_slo_s=ttft_s)


def decode(rid: str, model: str, last_s: float, tpot_s: float = 0.2) -> SeqView:
    return SeqView(rid, model, 0.0, False, 5, last_s, tpot_slo_s=tpot_s)


def test_deadlines():
    assert deadline_s(prefill("a", "m", 10.0, ttft_s=2.0)) == 12.0
    assert deadline_s(decode("b", "m", 10.0, tpot_s=0.1)) == 10.1
    started = SeqView("c", "m", 3.0, False, 0, None, ttft_slo_s=0.5)  # no token yet: still TTFT
    assert deadline_s(started) == 3.5


def test_no_work():
    assert pick_model([], 0.0, "m") is None


def test_earliest_deadline_first_across_models():
    seqs = [prefill("a", "m1", 0.0, ttft_s=2.0), decode("b", "m2", 0.5, tpot_s=0.2), prefill("c", "m1", 1.0)]
    assert earliest_deadlines(seqs) == {"m1": 2.0, "m2": 0.7}
    assert pick_model(seqs, 0.6, None) == "m2"
    assert [s.request_id for s in order_by_deadline(seqs)] == ["b", "a", "c"]


def test_switching_cost_keeps_current_model_when_close():
    seqs = [decode("a", "cur", 1.00, tpot_s=0.2), decode("b", "other", 1.19, tpot_s=0.0)]
    # other is due 0.01 s sooner: not worth a switch (default cost 0.02 s)
    assert pick_model(seqs, 1.0, "cur") == "cur"
    # much sooner: switch
    seqs[1] = decode("b", "other", 1.0, tpot_s=0.05)
    assert pick_model(seqs, 1.0, "cur") == "other"
    assert pick_model(seqs, 1.0, "cur", switch_cost_s=1.0) == "cur"


def test_anti_starvation_beats_hysteresis():
    # the current model keeps being "close enough", but another is overdue by a lot
    seqs = [decode("a", "cur", 0.0, tpot_s=0.2), prefill("b", "starved", 0.0, ttft_s=0.1)]
    assert pick_model(seqs, 1.0, "cur", switch_cost_s=10.0, starvation_s=0.5) == "starved"


def test_every_model_gets_a_turn_in_a_loop():
    """Simulate steps: the chosen model's sequences emit a token (deadline moves on)."""
    seqs = {m: decode(m, m, 0.0, tpot_s=0.1) for m in ("a", "b", "c")}
    current, now, counts = None, 0.0, {m: 0 for m in seqs}
    for _ in range(300):
        current = pick_model(list(seqs.values()), now, current)
        now += 0.01  # one step
        seqs[current] = decode(current, current, now, tpot_s=0.1)
        counts[current] += 1
    assert min(counts.values()) >= 80  # round-robin-like share, nobody starves
