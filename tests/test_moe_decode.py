"""MoE decode of one token: the grouped expert kernel against the per-expert loop and float64."""

import pytest
import torch
import torch.nn.functional as F

import c2c_kernels as kernels
from c2c_kernels.reference import linear_ref
from worker.layers import SwiGLU
from worker.moe import MoEBlock


@pytest.mark.parametrize("num_groups,n,k", [(2, 37, 64), (4, 8, 33), (3, 130, 17)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_linear_m1_matches_float64(num_groups, n, k, dtype):
    gen = torch.Generator().manual_seed(n * k)
    xs = torch.randn(num_groups, k, generator=gen)
    ws = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(num_groups)]
    got = kernels.grouped_linear_m1(xs, ws)
    want = torch.cat([linear_ref(xs[g:g + 1], ws[g]) for g in range(num_groups)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_grouped_linear_m1_rejects_mismatched_shapes():
    assert not kernels.can_group_m1([torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(5, 8, dtype=torch.bfloat16)])
    assert not kernels.can_group_m1([torch.zeros(4, 8), torch.zeros(4, 8)])  # fp32: F.linear's job
    with pytest.raises(ValueError):
        kernels.grouped_linear_m1(torch.zeros(2, 9), [torch.zeros(4, 8, dtype=torch.bfloat16)] * 2)


def _block(is_fused: bool, top_k: int, seed: int = 0) -> MoEBlock:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, num_experts = 48, 40, 6
    bf16 = lambda *shape: (torch.randn(*shape, generator=gen) * 0.2).to(torch.bfloat16)  # noqa: E731
    experts = []
    for _ in range(num_experts):
        gate, up, down = bf16(inter, hidden), bf16(inter, hidden), bf16(hidden, inter)
        experts.append(SwiGLU(None, None, torch.cat([gate, up]), down) if is_fused else SwiGLU(gate, up, None, down))
    return MoEBlock(bf16(num_experts, hidden), experts, top_k, renormalize=True)


def _reference(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """float64: softmax router, renormalized top-k, SwiGLU experts."""
    probs = torch.softmax(linear_ref(x, block.router), dim=-1)
    top_w, top_e = torch.topk(probs, block.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros(1, x.shape[1], dtype=torch.float64)
    for weight, e in zip(top_w[0].tolist(), top_e[0].tolist(), strict=True):
        mlp = block.experts[e]
        gate_up = mlp.gate_up if mlp.gate_up is not None else torch.cat([mlp.gate, mlp.up])
        gate, up = linear_ref(x, gate_up).chunk(2, dim=-1)
        out += weight * linear_ref(F.silu(gate) * up, mlp.down)
    return out


@pytest.mark.parametrize("is_fused", [True, False])
@pytest.mark.parametrize("top_k", [2, 3])
def test_one_token_takes_the_grouped_path_and_matches(is_fused, top_k, monkeypatch):
    block = _block(is_fused, top_k)
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(7))
    calls = []
    grouped = kernels.grouped_linear_m1
    monkeypatch.setattr(kernels, "grouped_linear_m1", lambda xs, ws: calls.append(len(ws)) or grouped(xs, ws))
    got = block(x, kernels.linear)
    assert calls == [top_k if is_fused else 2 * top_k, top_k]  # gate|up group, then down group
    torch.testing.assert_close(got.double(), _reference(block, x), rtol=1e-4, atol=1e-5)
    looped = block(x, lambda a, w, b=None: kernels.linear(a, w, b))  # any other linear: the loop
    torch.testing.assert_close(got, looped, rtol=1e-5, atol=1e-6)
