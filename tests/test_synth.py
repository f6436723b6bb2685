"""Synthesized checkpoints: files, tokenizer + chat template, determinism, presets, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer

from services.errors import InvalidRequest
from worker.checkpoint import index_checkpoint, load_checkpoint, load_config
from worker.layers import expected_tensors
from worker.synth import PRESETS, hf_config, synth_model
from worker.synth_tokenizer import ARCH_FAMILY, FAMILIES
from worker.synth_weights import layout_hint

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def render_chat(model_dir: Path) -> str:
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(tok_config["chat_template"])
    return template.render(messages=MESSAGES, add_generation_prompt=True,
                           bos_token=tok_config["bos_token"] or "", eos_token=tok_config["eos_token"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "mixtral", "qwen2_moe"])
def test_tiny_checkpoint_is_complete(tiny_model, arch):
    model_dir = tiny_model(arch)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (model_dir / name).is_file(), name
    config, _ = index_checkpoint(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config.vocab_size == 512
    text = "The capital of France is Paris. ünïcödé 🙂"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text and max(ids) < config.vocab_size
    family = FAMILIES[ARCH_FAMILY[arch]]
    eos_ids = [tokenizer.token_to_id(t) for t in family["gen_eos"]]
    assert set(config.eos_token_ids) == set(eos_ids)
    chat = render_chat(model_dir)
    assert "Hello there" in chat and "Be brief." in chat
    chat_ids = tokenizer.encode(chat, add_special_tokens=False).ids
    assert tokenizer.token_to_id(family["special"][-1 if arch != "llama" else 2]) in chat_ids


def test_chat_templates_per_family(tiny_model):
    assert render_chat(tiny_model("qwen2")).endswith("<|im_start|>assistant\n")
    assert render_chat(tiny_model("llama")).startswith("<|begin_of_text|><|start_header_id|>system")
    assert render_chat(tiny_model("mixtral")) == "<s>Be brief.\n\n[INST] Hello there [/INST]"


def test_transformers_reads_the_tokenizer(tiny_model):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(tiny_model("qwen2"))
    assert tokenizer.eos_token == "<|im_end|>"


def test_deterministic_given_seed(tmp_path):
    start = time.perf_counter()
    a = synth_model("qwen2_moe", "tiny", tmp_path / "a", seed=5)
    assert time.perf_counter() - start < 5.0      # generous: loaded CI machines
    b = synth_model("qwen2_moe", "tiny", tmp_path / "b", seed=5)
    c = synth_model("qwen2_moe", "tiny", tmp_path / "c", seed=6)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_small_preset_is_bf16_and_a_few_million_params(tmp_path):
    model_dir = synth_model("mixtral", "small", tmp_path / "small")
    config, tensors = load_checkpoint(model_dir, require_tokenizer=True)
    assert config.dtype == "bfloat16" and config.vocab_size == 2048
    assert {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}
    num_params = sum(t.numel() for t in tensors.values())
    assert 1e6 < num_params < 3e7


def _num_params(arch: str, preset: str, tmp_path) -> tuple[int, object]:
    p = PRESETS[preset]
    tok = {"bos_id": 1, "eos_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(hf_config(arch, preset, p, p["vocab"], tok)))
    config = load_config(tmp_path)
    shapes = expected_tensors(config, layout_hint(config))
    return sum(math.prod(s) for s in shapes.values()), config


def test_real_preset_shapes(tmp_path):
    qwen_params, qwen = _num_params("qwen2", "0.5b", tmp_path)
    assert (qwen.hidden_size, qwen.num_layers, qwen.num_heads, qwen.num_kv_heads) == (896, 24, 14, 2)
    assert qwen.tie_word_embeddings and qwen.vocab_size == 151936 and qwen.attention_bias
    assert 4.9e8 < qwen_params < 5.0e8             # Qwen2.5-0.5B: 494M
    llama_params, llama = _num_params("llama", "1b", tmp_path)
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.num_kv_heads == 8
    assert 1.23e9 < llama_params < 1.25e9          # Llama-3.2-1B: 1.24B


def test_bad_arguments_raise_named_errors(tmp_path):
    with pytest.raises(InvalidRequest, match="unknown arch 'gpt2'"):
        synth_model("gpt2", "tiny", tmp_path)
    with pytest.raises(InvalidRequest, match="unknown preset 'huge'"):
        synth_model("llama", "huge", tmp_path)
    with pytest.raises(InvalidRequest, match="unknown dtype 'int8'"):
        synth_model("llama", "tiny", tmp_path, dtype="int8")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "models", "synth", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_writes_a_checkpoint_and_reports_errors_in_one_line(tmp_path):
    done = cli("--arch", "mistral", "--preset", "tiny", "--out", str(tmp_path / "m"), "--seed", "2")
    assert done.returncode == 0, done.stderr
    assert "wrote mistral/tiny" in done.stdout
    assert load_config(tmp_path / "m").arch == "mistral"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad_out = cli("--arch", "llama", "--preset", "tiny", "--out", str(blocker))
    assert bad_out.returncode == 2
    assert bad_out.stderr.strip().count("\n") == 0 and "not a folder" in bad_out.stderr
    bad_arch = cli("--arch", "gpt2", "--preset", "tiny", "--out", str(tmp_path / "x"))
    assert bad_arch.returncode == 2 and "invalid choice: 'gpt2'" in bad_arch.stderr
    assert "Traceback" not in bad_arch.stderr + bad_out.stderr
