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


def test_encode_releases_the_gil_and_decodes_meanwhile(tok_dir):
    """Another Python thread keeps running (and decoding) while a long text is encoded:
    Tokenizer.encode of `tokenizers` holds the GIL, which stopped a worker's heartbeats."""
    import threading
    import time

    tok = Tokenizer(tok_dir)
    text = " ".join(CORPUS) * 3000  # ~1 MB
    ids = tok.encode("café crème")
    done, num_ticks, decoded = threading.Event(), [0], set()

    def tick():
        while not done.is_set():
            decoded.add(tok.decode(ids))
            num_ticks[0] += 1
            time.sleep(0.0005)  # waits for the GIL after each nap: no ticks while it is held

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        before = num_ticks[0]
        encoded = tok.encode(text)
        during = num_ticks[0] - before
    finally:
        done.set()
        ticker.join()
    assert len(encoded) > 100_000
    assert during >= 10  # holding the GIL for the whole encode gives 0-2
    assert decoded == {"café crème"}


def test_encode_matches_the_plain_encode(tok_dir):
    tok = Tokenizer(tok_dir)
    for text in ["hello world", " café  😀\n\nbrûlée ", "<s>hi</s> there", "x" * 5000]:
        for special in (True, False):
            assert tok.encode(text, special) == tok._tok.encode(text, add_special_tokens=special).ids


def test_text_that_is_not_unicode_is_invalid_request(tok_dir):
    with pytest.raises(InvalidRequest, match="prompt"):
        Tokenizer(tok_dir).encode("a\ud800b")


@pytest.fixture(scope="module")
def long_token_tok(tmp_path_factory):
    """A tokenizer whose tokens span whole long words (far more characters a token than the
    8 encode_bounded guesses first), so its prefix probing has to grow."""
    out = tmp_path_factory.mktemp("longtok")
    words = ["abcdefghijklmnopqrstuvwxyz", "zyxwvutsrqponmlkjihgfedcba", "thequickbrownfoxjumpsover"]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([" ".join(words * 50)] * 20, trainer)
    hf.save(str(out / "tokenizer.json"))
    return Tokenizer(out)


def test_encode_bounded_never_rejects_a_text_that_fits(long_token_tok, tok_dir):
    import random

    rng = random.Random(0)
    short_tok = Tokenizer(tok_dir)
    texts = [(long_token_tok, " abcdefghijklmnopqrstuvwxyz thequickbrownfoxjumpsover" * 3000),
             (long_token_tok, "abcdefghijklmnopqrstuvwxyz" * 4000),            # no space to cut at
             (short_tok, " ".join(rng.choice(CORPUS) for _ in range(3000))),
             (short_tok, "😀" * 20000)]
    for i, (tok, text) in enumerate(texts):
        ids = tok.encode(text)
        if i < 2:
            assert len(text) > 8 * (len(ids) + 64)  # long tokens: probing prefixes, it must grow
        for limit in (len(ids), len(ids) + 1, 10 * len(ids)):
            assert tok.encode_bounded(text, limit) == ids
        over = tok.encode_bounded(text, len(ids) // 2)  # None, or the ids when it was cheaper to encode all
        assert over is None if i < 2 else over in (None, ids)


def test_encode_bounded_reads_a_bounded_prefix_of_a_huge_text(tok_dir, monkeypatch):
    tok = Tokenizer(tok_dir)
    encoded_chars = []
    real_encode = tok._encode
    monkeypatch.setattr(tok, "_encode", lambda text, special: encoded_chars.append(len(text)) or real_encode(text, special))
    text = " ".join(CORPUS) * 3000  # ~1 MB, ~300k tokens
    assert tok.encode_bounded(text, 2047) is None
    assert sum(encoded_chars) <= 4 * 8 * (2047 + 64) < len(text) // 10


def test_check_messages():
    from worker.tokenizer import check_messages

    for bad in ([], {}, "hi", [1], [{"content": "x"}], [{"role": 1, "content": "x"}],
                [{"role": "user", "content": 5}]):
        with pytest.raises(InvalidRequest) as info:
            check_messages(bad)
        assert info.value.param == "messages"
    check_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}])
