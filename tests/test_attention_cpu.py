"""The CPU paged decode attention kernel against a float64 reference."""

import pytest
import torch

import c2c_kernels as kernels
from c2c_kernels import cpu_attention
from worker.forward_batch import ForwardBatch, build_attention_metadata


def _case(context_lens, num_heads, num_kv, dim, block_size, window, seed=0):
    """A filled paged cache, one decode step's batch and its metadata."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered physical blocks
    tables, start = [], 0
    for b in blocks_per_seq:
        tables.append(perm[start:start + b])
        start += b
    k_cache = torch.randn(num_blocks, block_size, num_kv, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv, dim, generator=gen)
    batch = ForwardBatch.build([[1]] * len(context_lens), [n - 1 for n in context_lens], tables, block_size)
    meta = build_attention_metadata(batch, block_size, window)
    s = len(context_lens)
    q = torch.randn(s, num_heads, dim, generator=gen)
    k_new, v_new = torch.randn(s, num_kv, dim, generator=gen), torch.randn(s, num_kv, dim, generator=gen)
    return q, k_new, v_new, k_cache, v_cache, meta


def _reference(q, k_new, v_new, k_cache, v_cache, meta):
    """float64, one sequence and head at a time, over the positions [low, len)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    num_kv, dim = k_cache.shape[-2:]
    block_size = k_cache.shape[1]
    k_cache.view(-1, num_kv, dim).index_copy_(0, meta.slot_mapping, k_new)
    v_cache.view(-1, num_kv, dim).index_copy_(0, meta.slot_mapping, v_new)
    group = q.shape[1] // num_kv
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, (low, n) in enumerate(zip(meta.decode_lows.tolist(), meta.decode_lens.tolist(), strict=True)):
        table = meta.padded_blocks[s]
        slots = [(int(table[p // block_size]), p % block_size) for p in range(low, n)]
        keys = torch.stack([k_cache[b, o] for b, o in slots]).double()   # [L, nKV, D]
        values = torch.stack([v_cache[b, o] for b, o in slots]).double()
        for head in range(q.shape[1]):
            scores = keys[:, head // group] @ q[s, head].double() / dim ** 0.5  # [L]
            out[s, head] = torch.softmax(scores, 0) @ values[:, head // group]
    return out, k_cache, v_cache


@pytest.mark.parametrize("context_lens,num_heads,num_kv,dim,block_size,window", [
    ([129], 14, 2, 64, 16, None),          # qwen2-0.5b shape at batch 1
    ([1], 4, 4, 8, 4, None),               # first decode token, MHA
    ([5, 17, 3, 40], 8, 2, 16, 4, None),   # ragged batch, GQA
    ([30, 9, 64], 6, 3, 32, 8, 12),        # sliding window shorter than some contexts
    ([300, 450], 16, 4, 64, 16, None),     # big enough for the threaded kernel
])
def test_decode_attention_matches_sdpa(context_lens, num_heads, num_kv, dim, block_size, window):
    q, k_new, v_new, k_cache, v_cache, meta = _case(context_lens, num_heads, num_kv, dim, block_size, window)
    want, want_k, want_v = _reference(q, k_new, v_new, k_cache, v_cache, meta)
    got = kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, meta.slot_mapping,
                                   meta.padded_blocks, meta.decode_lows, meta.decode_lens, meta.decode_max_keys)
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # the new k/v written


def test_serial_and_threaded_kernels_agree():
    q, k_new, v_new, k_cache, v_cache, meta = _case([70, 33, 128], 8, 2, 32, 16, None, seed=3)
    outs = []
    for fn in (cpu_attention.decode_attention_serial, cpu_attention.decode_attention_parallel):
        out, kc, vc = torch.empty_like(q), k_cache.clone(), v_cache.clone()
        fn(q.numpy(), k_new.numpy(), v_new.numpy(), kc.numpy(), vc.numpy(), meta.slot_mapping.numpy(),
           meta.padded_blocks.numpy(), meta.decode_lows.numpy(), meta.decode_lens.numpy(),
           torch.tensor(32 ** -0.5).numpy(), out.numpy())
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_only_fp32_cpu_caches_take_the_kernel():
    q = torch.randn(1, 2, 8)
    assert kernels.can_use_decode_attention(q, torch.zeros(1, 4, 1, 8))
    assert not kernels.can_use_decode_attention(q, torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16))
