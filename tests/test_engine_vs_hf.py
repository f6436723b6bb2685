"""Engine greedy decoding equals transformers' greedy generate on tiny fp32 checkpoints."""

import pytest
import torch

from worker.engine import Engine, EngineConfig, SamplingParams

ARCHS = ["llama", "qwen2", "mistral", "mixtral", "qwen2_moe"]
PROMPT = "the quick brown fox jumps over the lazy dog, then the fox"  # > 16 tokens: Mistral's window
NUM_NEW = 12


def _hf_greedy(model_dir, prompt_ids, num_new):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # fixed length, like ignore_eos
    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():  # explicit mask: else a BOS equal to pad_token_id is masked out
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=num_new,
                             min_new_tokens=num_new, do_sample=False, pad_token_id=model.config.vocab_size - 1)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_model, arch):
    model_dir = tiny_model(arch)
    engine = Engine(EngineConfig(residency="load", block_size=4, kv_cache_bytes=1 << 20, num_threads=1))
    engine.add_model(arch, model_dir)
    prompt_ids = engine.tokenizer(arch).encode(PROMPT)
    assert len(prompt_ids) > 16
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    ours = engine.generate(arch, prompt_ids, params)
    assert ours.finish_reason == "length"
    assert ours.new_token_ids == _hf_greedy(model_dir, prompt_ids, NUM_NEW)



# bf16 activations (about 3 significant digits) move a tiny random model's logits by ~1e-3:
# a greedy pick may then differ only where transformers' top two are that close.
BF16_LOGIT_TOL = 0.02


@pytest.mark.parametrize("math", ["exact", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_greedy_matches_transformers_on_bf16_weights(tiny_model, arch, math, monkeypatch):
    """bf16 weights take the prefill GEMM (a prompt > 16 tokens): exact fp32 maths must give
    transformers' (fp32 on the same widened weights) tokens; bf16 activations, as on an AMX
    CPU, must pick at every step a token within BF16_LOGIT_TOL of transformers' best logit
    for the same context (teacher-forced)."""
    monkeypatch.setenv("C2C_PREFILL_MATH", math)
    model_dir = tiny_model(arch, dtype="bfloat16")
    engine = Engine(EngineConfig(residency="load", block_size=4, kv_cache_bytes=1 << 20, num_threads=1))
    engine.add_model(arch, model_dir)
    prompt_ids = engine.tokenizer(arch).encode(PROMPT)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    ours = engine.generate(arch, prompt_ids, params).new_token_ids
    if math == "exact":
        assert ours == _hf_greedy(model_dir, prompt_ids, NUM_NEW)
        return
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + ours])).logits[0, len(prompt_ids) - 1:-1]  # [NUM_NEW, V]
    gaps = logits.max(-1).values - logits.gather(1, torch.tensor(ours)[:, None])[:, 0]
    assert float(gaps.max()) <= BF16_LOGIT_TOL, gaps
    assert ours[:5] == logits[:5].argmax(-1).tolist()  # clear margins on these models
