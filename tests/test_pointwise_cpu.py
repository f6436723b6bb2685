"""The CPU RMSNorm (residual add fused) and in-place RoPE kernels against float64 torch."""

import pytest
import torch

import c2c_kernels as kernels


@pytest.mark.parametrize("num_tokens,hidden", [(1, 896), (7, 33), (130, 64)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_float64(num_tokens, hidden, with_delta):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(num_tokens, hidden, generator=gen) * 3
    delta = torch.randn(num_tokens, hidden, generator=gen) if with_delta else None
    weight = torch.randn(hidden, generator=gen).to(torch.bfloat16).float()
    want_x = x.double() + (delta.double() if with_delta else 0)
    want = weight.double() * want_x * torch.rsqrt(want_x.pow(2).mean(-1, keepdim=True) + 1e-6)
    got = kernels.add_rms_norm(x, delta, weight, 1e-6)
    torch.testing.assert_close(x.double(), want_x, rtol=1e-6, atol=1e-6)  # the residual, in place
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_add_rms_norm_falls_back_for_other_dtypes():
    x, delta, weight = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64), torch.ones(16)
    want_x = x + delta
    got = kernels.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, want_x)
    torch.testing.assert_close(got, want_x * torch.rsqrt(want_x.pow(2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.parametrize("num_tokens,num_heads,dim", [(1, 14, 64), (5, 3, 8), (17, 2, 128)])
def test_rope_in_place_on_a_strided_view_matches_torch(num_tokens, num_heads, dim):
    gen = torch.Generator().manual_seed(dim)
    fused = torch.randn(num_tokens, (num_heads + 2) * dim, generator=gen)  # like a q|k|v output
    q = fused[:, : num_heads * dim].view(num_tokens, num_heads, dim)       # strided when T > 1
    angles = torch.randn(num_tokens, 1, dim, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    want = kernels.apply_rope(q.double(), cos.double(), sin.double())
    rest = fused[:, num_heads * dim:].clone()
    out = kernels.rope_(q, cos, sin)
    assert out.data_ptr() == q.data_ptr()
    torch.testing.assert_close(q.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused[:, num_heads * dim:], rest)  # the k|v part untouched
