"""Sampling: greedy, top-k, top-p, seeded reproducibility."""

from dataclasses import dataclass

import torch

from worker.sampling import Sampler, sample_row


@dataclass
class P:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def test_greedy_rows_take_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert Sampler().sample(logits, [P(0.0), P(0.0)], ["a", "b"]) == [1, 0]


def test_top_k_one_is_greedy():
    logits = torch.randn(50)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert sample_row(logits, 1.0, 1, 1.0, gen) == int(logits.argmax())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    gen = torch.Generator().manual_seed(0)
    seen = {sample_row(logits, 1.0, 0, 0.8, gen) for _ in range(200)}
    assert seen == {0, 1}


def test_top_k_restricts_support():
    logits = torch.tensor([1.0, 0.9, 0.8, -5.0, -6.0])
    gen = torch.Generator().manual_seed(1)
    assert {sample_row(logits, 2.0, 2, 1.0, gen) for _ in range(200)} == {0, 1}


def test_seeded_requests_reproduce_regardless_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    params = [P(0.8, seed=42), P(1.0), P(1.2, top_p=0.9, seed=7)]

    def run(rows):
        sampler = Sampler()
        return [sampler.sample(logits[rows], [params[r] for r in rows], [f"r{r}" for r in rows])
                for _ in range(20)]

    together = run([0, 1, 2])
    alone0, alone2 = run([0]), run([2])
    assert [t[0] for t in together] == [a[0] for a in alone0]
    assert [t[2] for t in together] == [a[0] for a in alone2]
    assert len({t[0] for t in together}) > 1  # it does sample


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    sampler = Sampler()
    draws = [sampler.sample(logits[None], [P(1.0, seed=3)], ["r"])[0] for _ in range(2000)]
    freq0 = draws.count(0) / len(draws)
    assert 0.65 < freq0 < 0.75


def test_tiny_temperature_is_greedy_and_never_nan():
    torch.manual_seed(3)
    logits = torch.randn(4, 64) * 30
    params = [P(1e-40), P(1e-6), P(4.9e-324), P(1e-40, top_k=5, top_p=1e-50, seed=1)]
    assert Sampler().sample(logits, params, ["a", "b", "c", "d"]) == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_the_top_token():
    torch.manual_seed(4)
    logits = torch.randn(64)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        assert sample_row(logits, 1.0, 0, 1e-50, gen) == int(logits.argmax())


def test_small_and_huge_temperatures_sample_without_error():
    logits = torch.tensor([1e30, -1e30, 0.0, 3.0])  # a spread that overflows logits / T
    gen = torch.Generator().manual_seed(0)
    assert sample_row(logits, 1e-5, 0, 1.0, gen) == 0
    assert {sample_row(logits, 1e38, 0, 1.0, gen) for _ in range(200)} == {0, 1, 2, 3}  # ~uniform


def test_a_bad_logits_row_fails_alone():
    logits = torch.tensor([[0.0, 2.0, 1.0],
                           [float("nan")] * 3,                # nothing to sample: this row fails
                           [float("nan"), 1.0, float("inf")],  # NaN out, +inf is the top token
                           [float("nan"), 5.0, 4.0]])
    params = [P(0.0), P(0.7, seed=1), P(0.0), P(1.0, top_k=1)]
    out = Sampler().sample(logits, params, ["a", "b", "c", "d"])
    assert out[0] == 1 and isinstance(out[1], Exception) and out[2] == 2 and out[3] == 1


def test_check_params_rejects_what_sampling_cannot_take():
    import pytest

    from services.errors import InvalidRequest
    from worker.engine import SamplingParams
    from worker.sampling import check_params

    bad = [dict(seed=1 << 64), dict(seed=-(1 << 63) - 1), dict(seed="1"), dict(temperature=10**400),
           dict(temperature="1"), dict(temperature=float("nan")), dict(top_p=None), dict(top_p=float("nan")),
           dict(max_tokens=1.5), dict(max_tokens=True), dict(stop=None), dict(stop=5), dict(stop=[1]),
           dict(stop_token_ids=None), dict(stop_token_ids=["a"]), dict(top_k=1.0)]
    for fields in bad:
        with pytest.raises(InvalidRequest) as info:
            check_params(SamplingParams(**fields))
        assert info.value.param == next(iter(fields))
    for fields in (dict(seed=(1 << 64) - 1), dict(seed=-(1 << 63)), dict(temperature=1e-40), dict(top_p=1e-50),
                   dict(temperature=10**30), dict(stop="x"), dict(top_k=10**9)):
        check_params(SamplingParams(**fields))
