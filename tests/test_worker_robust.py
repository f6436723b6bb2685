"""The engine under hostile input: extreme sampling values, one request failing mid-step,
huge prompts, ids outside the vocabulary, garbage at every entry. Innocent requests of
the same batch must get exactly their normal output."""

import math

import pytest

from services.errors import (
    C2CError,
    ContextLengthExceeded,
    ErrorCode,
    InvalidRequest,
    ModelNotFound,
)
from worker.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = "the quick brown fox jumps over the lazy dog"
EXTREME = {
    "t_tiny": dict(temperature=1e-40),
    "t_subnormal": dict(temperature=5e-324, top_k=3),
    "p_tiny": dict(temperature=1.0, top_p=1e-50),
    "all_tiny": dict(temperature=1e-40, top_p=1e-50, top_k=1, seed=(1 << 64) - 1),
}


@pytest.fixture(scope="module")
def qwen(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def engine(qwen):
    engine = Engine(EngineConfig(residency="load", block_size=4, kv_cache_bytes=1 << 20, num_threads=1))
    engine.add_model("q", qwen)
    return engine


@pytest.fixture(scope="module")
def alone(engine):
    return engine.generate("q", PROMPT, GREEDY).new_token_ids


def run(engine, requests):
    """requests: {request_id: (prompt, SamplingParams)} -> {request_id: [outputs]} (all steps)."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, "q", prompt=prompt, params=params)
    outputs = {request_id: [] for request_id in requests}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def tokens(outs):
    return [t for o in outs for t in o.new_token_ids]


def test_extreme_values_sample_and_leave_the_innocent_alone(engine, alone):
    requests = {"innocent": (PROMPT, GREEDY)}
    requests |= {name: (PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, **fields))
                 for name, fields in EXTREME.items()}
    requests["t_huge"] = (PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, temperature=1e30, seed=5))
    outputs = run(engine, requests)
    for request_id, outs in outputs.items():
        assert outs[-1].finish_reason == "length" and outs[-1].error is None, request_id
        assert len(tokens(outs)) == 8
    for request_id in ("innocent", *EXTREME):  # tiny T or tiny top_p: the top token, as greedy
        assert tokens(outputs[request_id]) == alone, request_id
    assert engine.stats().kv_used_frac == 0.0


def _fail_sampling_of(engine, monkeypatch, bad_request_id):
    sampler = engine.runner.sampler
    real = sampler._sample_one

    def sample_one(row, p, request_id, *args):
        if request_id == bad_request_id:
            raise RuntimeError("boom in sampling")
        return real(row, p, request_id, *args)

    monkeypatch.setattr(sampler, "_sample_one", sample_one)


def test_a_failed_sample_fails_that_request_only(engine, alone, monkeypatch):
    _fail_sampling_of(engine, monkeypatch, "bad")
    sampled = SamplingParams(max_tokens=8, temperature=0.8, seed=1, ignore_eos=True)
    outputs = run(engine, {"innocent": (PROMPT, GREEDY), "bad": (PROMPT, sampled), "other": (PROMPT, sampled)})
    bad = outputs["bad"][-1]
    assert bad.finished and bad.finish_reason == "error" and bad.error_code == ErrorCode.INTERNAL
    assert "boom in sampling" in bad.error and tokens(outputs["bad"]) == []
    assert tokens(outputs["innocent"]) == alone
    assert outputs["other"][-1].finish_reason == "length" and len(tokens(outputs["other"])) == 8
    assert engine.stats().kv_used_frac == 0.0 and not engine.has_work()


@pytest.mark.parametrize("num_good_tokens", [0, 3])
def test_a_failed_postprocess_fails_that_request_only(engine, alone, num_good_tokens):
    engine.add_request("bad", "q", prompt=PROMPT, params=GREEDY)
    engine.add_request("innocent", "q", prompt=PROMPT, params=GREEDY)
    stream = engine._requests["bad"].text
    real_add, num_added = stream.add, []

    def add(token_id):  # a detokenizer that breaks after `num_good_tokens` tokens
        if len(num_added) == num_good_tokens:
            raise ZeroDivisionError("boom in postprocessing")
        num_added.append(token_id)
        real_add(token_id)

    stream.add = add
    outputs = {"bad": [], "innocent": []}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    bad = outputs["bad"][-1]
    assert bad.finish_reason == "error" and "ZeroDivisionError: boom in postprocessing" in bad.error
    assert bad.error_code == ErrorCode.INTERNAL and tokens(outputs["bad"]) == alone[:num_good_tokens]
    assert tokens(outputs["innocent"]) == alone and outputs["innocent"][-1].finish_reason == "length"
    assert engine.stats().kv_used_frac == 0.0 and "bad" not in engine._requests


def test_tokenize_then_add_gives_the_same_request(engine, alone):
    ids = engine.tokenize_request("q", prompt=PROMPT)
    assert ids == engine.tokenizer("q").encode(PROMPT)
    assert engine.generate("q", ids, GREEDY).new_token_ids == alone
    messages = [{"role": "user", "content": PROMPT}]
    assert engine.tokenize_request("q", messages=messages) == engine.tokenizer("q").encode_chat(messages)


def test_a_huge_prompt_is_rejected_from_a_bounded_prefix(engine, monkeypatch):
    tokenizer = engine.tokenizer("q")
    encoded_chars = []
    real = tokenizer._encode
    monkeypatch.setattr(tokenizer, "_encode", lambda text, special: encoded_chars.append(len(text)) or real(text, special))
    huge = (PROMPT + " ") * 20_000  # ~900 KB
    window = engine.context_window("q")
    with pytest.raises(ContextLengthExceeded, match=str(window)):
        engine.tokenize_request("q", prompt=huge)
    with pytest.raises(ContextLengthExceeded) as info:
        engine.tokenize_request("q", messages=[{"role": "user", "content": huge}])
    assert info.value.param == "messages"
    assert max(encoded_chars) < len(huge) / 10
    with pytest.raises(ContextLengthExceeded, match=str(window)):
        engine.tokenize_request("q", prompt_token_ids=[1] * 10**6)


@pytest.mark.parametrize("ids", [[10**9], [-1], [1, 2.0], ["3"], [None], [True], 5, "12", {"a": 1}])
def test_prompt_ids_outside_the_vocabulary_are_invalid(engine, ids):
    with pytest.raises(InvalidRequest) as info:
        engine.tokenize_request("q", prompt_token_ids=ids)
    assert info.value.param == "prompt"


def test_vocab_edge_ids_are_accepted(engine):
    vocab_size = engine.runner.slots["q"].config.vocab_size
    assert engine.tokenize_request("q", prompt_token_ids=[0, vocab_size - 1]) == [0, vocab_size - 1]
    with pytest.raises(InvalidRequest, match=str(vocab_size)):
        engine.tokenize_request("q", prompt_token_ids=[0, vocab_size])


BAD_ADD_REQUESTS = [
    dict(request_id=None), dict(request_id=5), dict(request_id=""), dict(request_id=["x"]),
    dict(model_id=None), dict(model_id=["q"]), dict(model_id="nope"),
    dict(prompt=None), dict(prompt=5), dict(prompt="a\ud800"), dict(prompt="hi", prompt_token_ids=[1]),
    dict(prompt=None, messages=[]), dict(prompt=None, messages="hi"), dict(prompt=None, messages=[{"role": 1}]),
    dict(prompt=None, messages=[{"role": "user", "content": ["a", "b"]}]),  # str + list in the template
    dict(prompt=None, messages=[{"role": "user", "content": None}]),
    dict(params={"temperature": 0}), dict(params=SamplingParams(stop=None)),
    dict(params=SamplingParams(stop_token_ids=5)), dict(params=SamplingParams(seed=1 << 70)),
    dict(params=SamplingParams(temperature=10**400)), dict(params=SamplingParams(max_tokens=10**9)),
    dict(arrival_s=math.nan), dict(arrival_s="now"), dict(ttft_slo_s=-1.0), dict(tpot_slo_s=math.inf),
]


@pytest.mark.parametrize("fields", BAD_ADD_REQUESTS, ids=[str(f)[:60] for f in BAD_ADD_REQUESTS])
def test_bad_input_raises_a_named_error(engine, fields):
    kwargs = dict(request_id="r", model_id="q", prompt="hello", params=GREEDY) | fields
    with pytest.raises(C2CError):
        engine.add_request(**kwargs)
    assert not engine.has_work()


def test_other_entries_raise_named_errors(engine, alone):
    for call in (lambda: engine.abort(["r"]), lambda: engine.set_control(chunk_size="x"),
                 lambda: engine.set_control(rho=math.nan), lambda: engine.set_control(max_num_seqs=0),
                 lambda: engine.set_control(decode_threshold=math.inf)):
        with pytest.raises(InvalidRequest):
            call()
    for call in (lambda: engine.tokenize_request(["q"], prompt="x"), lambda: engine.context_window(None),
                 lambda: engine.tokenizer({}), lambda: engine.prewarm([]), lambda: engine.evict(None)):
        with pytest.raises(ModelNotFound):
            call()
    assert not engine.has_model(["q"])
    engine.abort("never-added")  # unknown ids are fine: the request may have just finished
    assert engine.generate("q", PROMPT, GREEDY).new_token_ids == alone
