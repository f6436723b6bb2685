"""The KV rotation policy (pure): slack, when a waiting request is at risk, whom to rotate
out and when to bring them back."""

from worker.rotation_policy import (
    DecodeView,
    RotationConfig,
    WaitingView,
    pick_rotate_in,
    pick_rotate_out,
    split_rotate_out,
    tpot_slack_s,
    ttft_at_risk,
)

STEP_S = 0.01


def decode(rid: str, num_blocks: int, slack_s: float, num_remaining: int = 100) -> DecodeView:
    return DecodeView(rid, num_blocks, slack_s, num_remaining)


def test_slack_is_the_time_left_before_the_mean_tpot_breaks():
    # first token at 1.0, 10 generated, SLO 0.1 s/token: the 11th may come by 2.0
    assert tpot_slack_s(1.0, 10, 0.1, now_s=1.5) == 0.5
    assert tpot_slack_s(1.0, 10, 0.1, now_s=2.2) < 0


def test_at_risk_when_finishing_decodes_free_blocks_too_late():
    waiting = WaitingView("w", num_blocks_needed=4, ttft_deadline_s=1.0, num_prefill_steps=2)
    soon = [decode("a", 4, 1.0, num_remaining=10)]  # frees 4 blocks after 0.1 s
    late = [decode("a", 4, 1.0, num_remaining=200)]  # after 2 s
    assert not ttft_at_risk(waiting, soon, STEP_S, now_s=0.0)
    assert ttft_at_risk(waiting, late, STEP_S, now_s=0.0)
    assert ttft_at_risk(waiting, [decode("a", 2, 1.0, 1)], STEP_S, now_s=0.0)  # never enough blocks


def test_not_at_risk_without_a_block_shortage_or_past_saving():
    late = [decode("a", 4, 1.0, num_remaining=200)]
    fits = WaitingView("w", num_blocks_needed=0, ttft_deadline_s=1.0, num_prefill_steps=2)
    lost = WaitingView("w", num_blocks_needed=4, ttft_deadline_s=1.0, num_prefill_steps=2)
    assert not ttft_at_risk(fits, late, STEP_S, now_s=0.0)
    assert not ttft_at_risk(lost, late, STEP_S, now_s=0.995)  # its prefill alone ends past the deadline


def test_rotate_out_most_slack_first_until_the_need_is_covered():
    running = [decode("a", 3, 0.5), decode("b", 3, 2.0), decode("c", 3, 1.0)]
    chosen = pick_rotate_out(running, num_blocks_needed=5, num_free_host_blocks=100, step_s=STEP_S)
    assert [v.request_id for v in chosen] == ["b", "c"]


def test_rotate_out_skips_sequences_without_enough_slack():
    running = [decode("a", 3, 0.05), decode("b", 3, 2.0)]
    config = RotationConfig(out_min_slack_steps=8)  # 0.08 s at 10 ms steps
    assert pick_rotate_out(running, 3, 100, STEP_S, config) == [running[1]]
    assert pick_rotate_out(running, 6, 100, STEP_S, config) == []  # all or nothing


def test_rotate_out_respects_the_host_tier():
    running = [decode("a", 6, 2.0), decode("b", 3, 1.0)]
    chosen = pick_rotate_out(running, num_blocks_needed=3, num_free_host_blocks=4, step_s=STEP_S)
    assert [v.request_id for v in chosen] == ["b"]  # "a" has more slack but does not fit
    assert pick_rotate_out(running, num_blocks_needed=3, num_free_host_blocks=2, step_s=STEP_S) == []


def test_rotate_in_urgent_first_even_over_waiting_requests():
    rotated = [decode("calm", 2, 5.0), decode("urgent", 2, 0.02)]  # margin 4 steps = 0.04 s
    chosen = pick_rotate_in(rotated, num_free_blocks=3, num_waiting_blocks=10, step_s=STEP_S)
    assert [v.request_id for v in chosen] == ["urgent"]


def test_rotate_in_calm_ones_only_with_blocks_to_spare():
    rotated = [decode("calm", 2, 5.0)]
    assert pick_rotate_in(rotated, num_free_blocks=3, num_waiting_blocks=2, step_s=STEP_S) == []
    assert pick_rotate_in(rotated, num_free_blocks=4, num_waiting_blocks=2, step_s=STEP_S) == rotated


def test_rotate_in_an_urgent_one_that_does_not_fit_holds_the_others_back():
    rotated = [decode("urgent", 5, 0.01), decode("small", 1, 0.02)]
    assert pick_rotate_in(rotated, num_free_blocks=3, num_waiting_blocks=0, step_s=STEP_S) == []


def test_split_rotates_the_victims_that_fit_and_recomputes_the_rest():
    a, b, c = (DecodeView(n, k, 1.0, 10) for n, k in (("a", 3), ("b", 4), ("c", 2)))
    rotate, recompute = split_rotate_out([a, b, c], 5)
    assert [v.request_id for v in rotate] == ["a", "c"]
    assert [v.request_id for v in recompute] == ["b"]
    assert split_rotate_out([a, b], 0) == ([], [a, b])
