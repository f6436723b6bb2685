"""The sampler's logits processors and logprobs against a plain-Python reference of vLLM's
semantics; the engine's min_tokens, logit_bias and JSON constraint on a tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from services.errors import InvalidRequest
from worker.sampling import SampleContext, Sampler, apply_processors, check_params


@dataclass
class P:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict = field(default_factory=dict)
    min_tokens: int = 0
    logprobs: int | None = None


def reference(logits: list[float], p: P, prompt: list[int], output: list[int], stop_ids: list[int]) -> list[float]:
    """vLLM's processors, one token at a time: min_tokens, logit_bias, repetition (prompt +
    output), frequency and presence (output)."""
    out = list(logits)
    if len(output) < p.min_tokens:
        for t in stop_ids:
            out[t] = -math.inf
    for t, b in p.logit_bias.items():
        out[t] += b
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1.0:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


CASES = {
    "repetition": P(repetition_penalty=1.7),
    "repetition-below-1": P(repetition_penalty=0.6),
    "frequency": P(frequency_penalty=1.5),
    "presence": P(presence_penalty=-0.8),
    "all-three": P(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.4),
    "logit-bias": P(logit_bias={3: 5.0, 7: -100.0, 0: 0.5}),
    "min-tokens": P(min_tokens=4),
    "everything": P(repetition_penalty=1.2, frequency_penalty=-0.5, presence_penalty=1.0, logit_bias={2: 3.0},
                    min_tokens=9),
}


@pytest.mark.parametrize("name", CASES)
def test_processors_match_the_reference(name):
    p, vocab_size = CASES[name], 12
    gen = torch.Generator().manual_seed(len(name))
    logits = torch.randn(vocab_size, generator=gen) * 3  # [V], both signs
    prompt, output, stop_ids = [1, 2, 2, 5], [5, 3, 3, 3, 9, 0], [0, 11]
    context = SampleContext(prompt + output, len(prompt), tuple(stop_ids))
    got = apply_processors(logits.clone(), p, context).tolist()
    want = reference(logits.tolist(), p, prompt, output, stop_ids)
    for g, w in zip(got, want, strict=True):
        assert (g == w == -math.inf) or abs(g - w) < 1e-5, (got, want)


def test_greedy_decode_with_penalties_follows_the_reference():
    """Several steps: the sampler's greedy choice equals argmax of the reference each step."""
    vocab_size, prompt = 16, [4, 4, 9]
    table = torch.randn(64, vocab_size, generator=torch.Generator().manual_seed(0))  # a fake model's logits per step
    p = P(repetition_penalty=1.5, frequency_penalty=0.6, presence_penalty=0.3, logit_bias={5: 1.0}, min_tokens=3)
    sampler, tokens = Sampler(), list(prompt)
    sampler.track("r", SampleContext(tokens, len(prompt), (0,)))
    for step in range(12):
        want_logits = reference(table[step].tolist(), p, prompt, tokens[len(prompt):], [0])
        want = max(range(vocab_size), key=lambda t: want_logits[t])
        got = sampler.sample(table[step][None], [p], ["r"])[0]
        assert got == want, step
        tokens.append(got)


def test_logprobs_are_the_raw_log_softmax_with_the_top_k():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.5, 0.0]])
    sampler = Sampler()
    sampler.track("r", SampleContext([1], 1, ()))
    p = P(logprobs=2, logit_bias={4: 50.0})  # the bias picks token 4; logprobs stay the model's
    assert sampler.sample(logits, [p], ["r"]) == [4]
    lp = sampler.logprobs.pop("r")
    want = torch.log_softmax(logits[0], dim=-1)
    assert lp.token_id == 4 and lp.logprob == pytest.approx(float(want[4]))
    assert lp.top_token_ids == [1, 3] and lp.top_logprobs == pytest.approx([float(want[1]), float(want[3])])


def test_plain_requests_keep_the_fast_path_and_others_are_unchanged():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    sampler = Sampler()
    sampler.track("biased", SampleContext([0], 1, ()))
    out = sampler.sample(logits, [P(), P(logit_bias={2: 10.0})], ["plain", "biased"])
    assert out == [1, 2]


@pytest.mark.parametrize("field_name,value", [
    ("presence_penalty", 2.5), ("frequency_penalty", float("nan")), ("repetition_penalty", 0.0),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {1: 101.0}), ("min_tokens", 17), ("logprobs", 21),
])
def test_check_params_names_the_bad_extra(field_name, value):
    with pytest.raises(InvalidRequest) as info:
        check_params(P(**{field_name: value}))
    assert info.value.param == field_name


# -- through the engine --------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model):
    from worker.engine import Engine

    engine = Engine()
    engine.add_model("m", tiny_model("llama"))
    return engine


def test_min_tokens_suppresses_eos(engine):
    from worker.engine import SamplingParams

    eos = engine.tokenizer("m").eos_token_ids[0]
    forced = SamplingParams(max_tokens=8, temperature=0.0, logit_bias={eos: 100.0})
    assert engine.generate("m", "Hello", forced).num_generated_tokens == 1  # EOS at once
    held = SamplingParams(max_tokens=8, temperature=0.0, logit_bias={eos: 100.0}, min_tokens=5)
    out = engine.generate("m", "Hello", held)
    assert out.finish_reason == "stop" and out.num_generated_tokens == 6 and out.new_token_ids[-1] == eos
    assert eos not in out.new_token_ids[:5]


def test_logit_bias_past_the_vocabulary_is_refused(engine):
    from worker.engine import SamplingParams

    with pytest.raises(InvalidRequest) as info:
        engine.add_request("x", "m", prompt="hi", params=SamplingParams(logit_bias={10**6: 1.0}))
    assert info.value.param == "logit_bias" and not engine.has_work()


def test_json_schema_output_parses_and_follows_the_schema(engine):
    from worker.engine import SamplingParams

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]},
                                               "name": {"type": "string", "maxLength": 6}},
              "required": ["ok", "tag", "name"], "additionalProperties": False}
    for seed in range(3):
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed, json_schema=json.dumps(schema))
        out = engine.generate("m", "Answer in JSON", params)
        value = json.loads(out.new_text)
        assert out.finish_reason == "stop" and set(value) == {"ok", "tag", "name"}
        assert isinstance(value["ok"], bool) and value["tag"] in ("a", "b") and len(value["name"]) <= 6


def test_a_resumed_request_continues_as_if_never_interrupted(engine):
    """Re-dispatch: the tokens generated before count as output for penalties and min_tokens."""
    from worker.engine import SamplingParams

    # the bias makes token 100 first; once generated, the penalties (4 in all) take its lead away
    extras = dict(temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0, logit_bias={100: 5.0})
    whole = engine.generate("m", "Hello there", SamplingParams(max_tokens=8, **extras)).new_token_ids
    assert whole[0] == 100 and 100 not in whole[1:]
    prompt = engine.tokenize_request("m", prompt="Hello there")
    resumed = SamplingParams(max_tokens=5, num_resumed_tokens=3, min_tokens=8, **extras)
    assert engine.generate("m", prompt + whole[:3], resumed).new_token_ids == whole[3:]
    as_prompt = SamplingParams(max_tokens=5, **extras)  # the same tokens as a plain prompt: 100 again
    assert engine.generate("m", prompt + whole[:3], as_prompt).new_token_ids[0] == 100


def test_stop_strings_apply_only_after_min_tokens(engine):
    from worker.engine import SamplingParams

    plain = engine.generate("m", "Hello", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    stop = plain.new_text[:1]
    assert stop
    stopped = engine.generate("m", "Hello", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert stopped.finish_reason == "stop" and stopped.new_text == "" and stopped.num_generated_tokens == 1
    held = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=[stop], min_tokens=4)
    out = engine.generate("m", "Hello", held)
    assert out.num_generated_tokens >= 4 and out.new_text.startswith(stop)


def test_grammar_matchers_of_one_schema_are_compiled_once_and_independent(engine):
    from worker import constrained

    schema = json.dumps({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    tokenizer = engine.tokenizer("m")
    first, second = constrained.GrammarMatcher(tokenizer, schema), constrained.GrammarMatcher(tokenizer, schema)
    start = first.allowed(512)
    brace = int(start.nonzero()[0])  # a token the grammar allows first
    assert first.accept(brace)
    assert not bool((first.allowed(512) == start).all())
    assert bool((second.allowed(512) == start).all())  # untouched by the first one's token
    assert sum(key[1] == schema for key in constrained._matchers) == 1
    with pytest.raises(InvalidRequest):
        constrained.GrammarMatcher(tokenizer, json.dumps({"type": "no-such-type"}))
