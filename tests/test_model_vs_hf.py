"""Our CausalLM over the paged KV cache against transformers, on tiny random checkpoints."""

from __future__ import annotations

import random

import pytest
import torch

from worker.checkpoint import load_checkpoint
from worker.forward_batch import ForwardBatch
from worker.model import CausalLM, KVCache

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "qwen2", "mistral", "mixtral", "qwen2_moe"]
BLOCK_SIZE = 4
ATOL = 1e-4


class PagedRunner:
    """Our model plus a KV cache whose blocks are handed out in a shuffled order."""

    def __init__(self, model_dir, num_blocks: int = 64):
        self.config, weights = load_checkpoint(model_dir)
        self.model = CausalLM(self.config, weights)
        self.kv = KVCache.allocate(self.config, num_blocks, BLOCK_SIZE, torch.float32)
        self.free_blocks = list(range(num_blocks))
        random.Random(0).shuffle(self.free_blocks)

    def new_table(self, max_tokens: int) -> list[int]:
        count = -(-max_tokens // BLOCK_SIZE)
        table, self.free_blocks = self.free_blocks[:count], self.free_blocks[count:]
        return table

    def step(self, chunks: list[list[int]], cached: list[int], tables: list[list[int]],
             logits: str = "all") -> list[torch.Tensor]:
        """Run one batch; return per sequence its logits rows ([q_len, V] or [1, V])."""
        batch = ForwardBatch.build(chunks, cached, tables, BLOCK_SIZE, logits=logits)
        out = self.model.forward(batch, self.kv)
        sizes = [len(c) if logits == "all" else 1 for c in chunks]
        return list(out.split(sizes))


def hf_model(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()   # [L, V]


def prompt(config, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (length,), generator=gen).tolist()


@pytest.fixture(scope="module", params=ARCHS)
def arch_pair(request, tiny_model):
    model_dir = tiny_model(request.param)
    return request.param, model_dir, hf_model(model_dir)


def test_full_prompt_logits_match(arch_pair):
    _, model_dir, hf = arch_pair
    runner = PagedRunner(model_dir)
    ids = prompt(runner.config, 23, seed=1)
    (ours,) = runner.step([ids], [0], [runner.new_table(23)])
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_chunked_prefill_then_greedy_decode(arch_pair):
    _, model_dir, hf = arch_pair
    runner = PagedRunner(model_dir)
    ids = prompt(runner.config, 23, seed=2)
    table = runner.new_table(40)
    rows, done = [], 0
    for size in (7, 9, 7):                  # chunk edges at 7 and 16 cross block edges
        (chunk_logits,) = runner.step([ids[done:done + size]], [done], [table])
        rows.append(chunk_logits)
        done += size
    torch.testing.assert_close(torch.cat(rows), hf_logits(hf, ids), atol=ATOL, rtol=0)

    tokens = [int(rows[-1][-1].argmax())]
    for _ in range(5):
        (step_logits,) = runner.step([tokens[-1:]], [done], [table], logits="last")
        done += 1
        tokens.append(int(step_logits[0].argmax()))
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                           attention_mask=torch.ones(1, 23, dtype=torch.long))
    assert tokens == expected[0, 23:].tolist()


def test_batch_of_two_sequences_mixed_steps(arch_pair):
    _, model_dir, hf = arch_pair
    runner = PagedRunner(model_dir)
    a, b = prompt(runner.config, 23, seed=3), prompt(runner.config, 11, seed=4)
    tables = [runner.new_table(32), runner.new_table(32)]
    # step 1: both prefill in one batch (different lengths)
    out_a, out_b = runner.step([a, b[:6]], [0, 0], tables)
    torch.testing.assert_close(out_a, hf_logits(hf, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, hf_logits(hf, b[:6]), atol=ATOL, rtol=0)
    # step 2: a decodes one token while b prefills its second chunk (mixed batch)
    a.append(int(out_a[-1].argmax()))
    out_a, out_b = runner.step([a[-1:], b[6:]], [23, 6], tables)
    torch.testing.assert_close(out_a[0], hf_logits(hf, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, hf_logits(hf, b)[6:], atol=ATOL, rtol=0)
    # step 3: batched decode (fast path) with different context lengths
    a.append(7)
    b.append(9)
    out_a, out_b = runner.step([a[-1:], b[-1:]], [24, 11], tables, logits="last")
    torch.testing.assert_close(out_a[0], hf_logits(hf, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b[0], hf_logits(hf, b)[-1], atol=ATOL, rtol=0)


def test_bf16_weights_match_fp32_reference(tiny_model):
    model_dir = tiny_model("qwen2_moe", dtype="bfloat16")
    runner = PagedRunner(model_dir)
    assert runner.config.dtype == "bfloat16"
    assert runner.model.embed.dtype == torch.bfloat16      # weights stay bf16
    ids = prompt(runner.config, 19, seed=5)
    table = runner.new_table(20)
    (ours,) = runner.step([ids], [0], [table])
    # HF in fp32 on the upcast bf16 weights: our kernel widens bf16 the same way
    hf = hf_model(model_dir)
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=2e-3, rtol=0)
    # one decode token: the experts run through the grouped one-token kernel
    (ours,) = runner.step([[11]], [19], [table], logits="last")
    torch.testing.assert_close(ours[0], hf_logits(hf, ids + [11])[-1], atol=2e-3, rtol=0)


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return model


def _hf_saved_configs():
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    return {
        "llama": transformers.LlamaConfig(intermediate_size=48, tie_word_embeddings=True, **common),
        "mixtral": transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common),
        "qwen2_moe": transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24,
                                                 shared_expert_intermediate_size=40, num_experts=4,
                                                 num_experts_per_tok=2, norm_topk_prob=True,
                                                 decoder_sparse_step=2, **common),
    }


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2_moe"])
def test_loads_what_save_pretrained_writes(arch, tmp_path):
    config = _hf_saved_configs()[arch]
    hf = _randomize(transformers.AutoModelForCausalLM.from_config(config), seed=7).eval()
    hf.save_pretrained(tmp_path)
    runner = PagedRunner(tmp_path)
    if arch == "qwen2_moe":
        assert runner.config.moe_layers == (1,)         # decoder_sparse_step=2: layer 0 dense
    ids = prompt(runner.config, 13, seed=8)
    (ours,) = runner.step([ids], [0], [runner.new_table(13)])
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_fused_expert_layout_matches_per_expert(tiny_model, tmp_path):
    """Experts stored fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]) give the same logits."""
    import shutil

    from safetensors.torch import save_file

    source = tiny_model("mixtral")
    config, weights = load_checkpoint(source)
    fused = {}
    for name, tensor in weights.items():
        if ".experts." not in name:
            fused[name.replace("block_sparse_moe", "mlp")] = tensor
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        experts = range(config.num_experts)
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{p}.{e}.w1.weight"], weights[f"{p}.{e}.w3.weight"]]) for e in experts])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [weights[f"{p}.{e}.w2.weight"] for e in experts])
    shutil.copy(source / "config.json", tmp_path / "config.json")
    save_file(fused, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids = prompt(config, 17, seed=9)
    per_expert, fused_runner = PagedRunner(source), PagedRunner(tmp_path)
    (want,) = per_expert.step([ids], [0], [per_expert.new_table(17)])
    (got,) = fused_runner.step([ids], [0], [fused_runner.new_table(17)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
