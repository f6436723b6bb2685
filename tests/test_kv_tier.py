"""The host KV tier's copies (real tensors): blocks go out and come back bit for bit, into
other block ids, with both directions in flight at once; sizes and byte counts."""

import torch

from worker.checkpoint import load_config
from worker.kv_tier import IN, OUT, KVTier
from worker.model import KVCache, kv_bytes_per_token

BLOCK_SIZE = 4


def _tier(tiny_model, num_device_blocks=8, num_host_blocks=6):
    config = load_config(tiny_model("llama"))
    device = KVCache.allocate(config, num_device_blocks, BLOCK_SIZE)
    block_bytes = BLOCK_SIZE * kv_bytes_per_token(config)
    tier = KVTier(num_host_blocks * block_bytes + block_bytes - 1, BLOCK_SIZE, lambda model_id: device)
    assert tier.add_model("m", config) == num_host_blocks  # whole blocks only
    return tier, device, block_bytes


def test_blocks_go_out_and_back_exactly_into_other_blocks(tiny_model):
    tier, device, block_bytes = _tier(tiny_model)
    device.k.copy_(torch.randn_like(device.k))
    device.v.copy_(torch.randn_like(device.v))
    k_before, v_before = device.k[:, [1, 4]].clone(), device.v[:, [1, 4]].clone()
    out = tier.start("m", OUT, [1, 4], [5, 0])
    assert out.wait(timeout_s=60) and out.error is None
    back = tier.start("m", IN, [5, 0], [2, 7])
    other_out = tier.start("m", OUT, [3], [2])  # the other direction at the same time
    assert back.wait(timeout_s=60) and other_out.wait(timeout_s=60)
    assert torch.equal(device.k[:, [2, 7]], k_before) and torch.equal(device.v[:, [2, 7]], v_before)
    assert tier.num_bytes_out == 3 * block_bytes and tier.num_bytes_in == 2 * block_bytes


def test_a_failed_copy_is_reported_and_the_thread_goes_on(tiny_model):
    tier, _, _ = _tier(tiny_model)
    bad = tier.start("m", OUT, [0], [99])  # no host block 99
    assert bad.wait(timeout_s=60) and isinstance(bad.error, (IndexError, RuntimeError))
    good = tier.start("m", OUT, [0], [1])
    assert good.wait(timeout_s=60) and good.error is None
