"""Byte-level BPE tokenizers for synthesized checkpoints, with each family's chat format.

Trained with the `tokenizers` package on `worker.tokenizer_data` text, once per
(family, vocab size) per process. Special tokens take the first ids.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

# family -> (special tokens, bos, eos, extra eos for generation, chat template)
_LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

FAMILIES = {
    "llama": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>"],
                  bos="<|begin_of_text|>", eos="<|eot_id|>", gen_eos=["<|end_of_text|>", "<|eot_id|>"],
                  template=_LLAMA_TEMPLATE),
    "qwen": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 bos=None, eos="<|im_end|>", gen_eos=["<|im_end|>", "<|endoftext|>"],
                 template=_CHATML_TEMPLATE, pad="<|endoftext|>"),
    "mistral": dict(special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    bos="<s>", eos="</s>", gen_eos=["</s>"], template=_INST_TEMPLATE),
}
ARCH_FAMILY = {"llama": "llama", "qwen2": "qwen", "qwen2_moe": "qwen", "mistral": "mistral",
               "mixtral": "mistral"}


@lru_cache(maxsize=16)
def trained_tokenizer_json(family: str, vocab_size: int) -> str:
    """tokenizer.json text of a byte-level BPE with `vocab_size` entries (cached per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from worker.tokenizer_data import training_corpus

    spec = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    bos = spec["bos"]
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer.to_str()


def write_tokenizer(out_dir: Path, arch: str, vocab_size: int, max_length: int) -> dict:
    """Write tokenizer.json + tokenizer_config.json; return {bos_id, eos_id, gen_eos_ids, size}."""
    family = ARCH_FAMILY[arch]
    spec = FAMILIES[family]
    text = trained_tokenizer_json(family, vocab_size)
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    vocab = json.loads(text)["model"]["vocab"]
    added = {t["content"]: t["id"] for t in json.loads(text)["added_tokens"]}
    token_id = {**vocab, **added}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"], "eos_token": spec["eos"],
        "pad_token": spec.get("pad"), "unk_token": None,
        "chat_template": spec["template"],
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": spec["bos"] is not None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    return {
        "bos_id": token_id[spec["bos"]] if spec["bos"] else None,
        "eos_id": token_id[spec["eos"]],
        "gen_eos_ids": [token_id[t] for t in spec["gen_eos"]],
        "size": len(token_id),
    }
