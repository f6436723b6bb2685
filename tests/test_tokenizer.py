"""Tokenizer: eos ids, chat templates, incremental detokenization of multi-byte text."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from services.errors import CheckpointError, InvalidRequest
from worker.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = ["hello world", "café crème brûlée", "emoji 😀 party 🎉", "the quick brown fox"] * 5


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer)
    hf.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE}))
    (out / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return out


def test_encode_decode_round_trip(tok_dir):
    tok = Tokenizer(tok_dir)
    for text in ["hello world", "café 😀 brûlée"]:
        assert tok.decode(tok.encode(text)) == text


def test_eos_ids_from_all_configs(tok_dir):
    assert set(Tokenizer(tok_dir).eos_token_ids) == {1, 2}


def test_chat_template_renders_like_transformers(tok_dir):
    tok = Tokenizer(tok_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages)
    assert text == "<s><|system|>be brief</s>\n<|user|>hi</s>\n<|assistant|>"
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("<|assistant|>")
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.token_to_id("<s>")


def test_chat_template_raise_exception_is_invalid_request(tok_dir):
    with pytest.raises(InvalidRequest, match="bad role"):
        Tokenizer(tok_dir).apply_chat_template([{"role": "robot", "content": "x"}])


def test_missing_tokenizer_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map used by ByteLevel tokenizers."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    byte_to_char = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in byte_to_char]
    byte_to_char.update({b: chr(256 + n) for n, b in enumerate(others)})
    return byte_to_char


def _byte_tokens(tok, text):
    """Ids of the single-byte tokens spelling `text` (forces characters across tokens)."""
    byte_to_char = _bytes_to_unicode()
    return [tok.token_to_id(byte_to_char[b]) for b in text.encode("utf-8")]


@pytest.mark.parametrize("text", ["é", "a😀b", "café 😀🎉 ok", "😀"])
def test_incremental_detok_never_splits_a_character(tok_dir, text):
    tok = Tokenizer(tok_dir)
    ids = _byte_tokens(tok, text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: characters span tokens
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    deltas = [detok.add(i) for i in ids]
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    assert "" in deltas  # some were held back mid-character


def test_incremental_detok_matches_full_decode_on_real_tokens(tok_dir):
    tok = Tokenizer(tok_dir)
    prompt = tok.encode("emoji")
    gen = tok.encode(" party 😀 café crème the quick fox")
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(detok.add(i) for i in gen) + detok.flush()
    assert text == tok.decode(gen)


def test_flush_emits_an_incomplete_character_at_the_end(tok_dir):
    tok = Tokenizer(tok_dir)
    detok = IncrementalDetokenizer(tok, [])
    first_byte_of_emoji = _byte_tokens(tok, "😀")[0]
    assert detok.add(first_byte_of_emoji) == ""
    assert detok.flush() == REPLACEMENT_CHAR
