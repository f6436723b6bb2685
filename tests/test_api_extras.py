"""The OpenAI API past plain sampling, end to end through the official `openai` client
against a LocalCluster (real nats-server and Valkey, gateway, placer, controller, a CPU
worker) on a tiny random model: n, logprobs, echo, prompt arrays, penalties and
logit_bias, min_tokens, JSON mode, unknown fields, the vLLM-named metrics.

References come from the engine itself in this process: greedy texts, and the raw logits
of each step (the sampler's input) for logprobs and for a plain-Python penalty decoder.
"""

from __future__ import annotations

import json
import math
import re

import aiohttp
import pytest
import torch

from services.launcher import LocalCluster

openai = pytest.importorskip("openai")

PROMPTS = ["The quick brown fox", "Hello, world"]
CHAT = [{"role": "user", "content": "Say something"}]
MAX_TOKENS = 8
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(servers, model_dir):
    with LocalCluster([model_dir], num_workers=1, nats_url=servers.nats_url, redis_url=servers.redis_url,
                      extra_env={"C2C_PREWARM_INTERVAL_S": "0"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(model_dir):
    from worker.engine import Engine

    engine = Engine()
    engine.add_model(model_dir.name, model_dir)
    return engine


def _greedy(engine, model_id: str, prompt=None, messages=None, **params):
    from worker.engine import SamplingParams

    p = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **params)
    return engine.generate(model_id, prompt, p, **({"messages": messages} if messages else {}))


def _step_logits(engine, model_id: str, token_ids: list[int]) -> torch.Tensor:
    """The engine's raw logits [V] for the next token after `token_ids` (the sampler's input)."""
    from worker.engine import SamplingParams

    sampler, captured = engine.runner.sampler, []
    real = sampler.sample

    def capture(logits, params, request_ids):
        captured.append(logits[-1].clone())
        return real(logits, params, request_ids)

    sampler.sample = capture
    try:
        engine.generate(model_id, token_ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    finally:
        del sampler.sample
    return captured[-1]


# -- n and prompt arrays ---------------------------------------------------------------------
def test_n_greedy_samples_equal_one_greedy_sample(client, engine, model_dir):
    model_id = model_dir.name
    want = _greedy(engine, model_id, PROMPTS[0]).new_text
    got = client.completions.create(model=model_id, prompt=PROMPTS[0], n=3, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=NO_EOS)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [want] * 3
    assert got.usage.completion_tokens == 3 * MAX_TOKENS
    assert got.usage.prompt_tokens == _greedy(engine, model_id, PROMPTS[0]).num_prompt_tokens  # counted once
    want_chat = _greedy(engine, model_id, messages=CHAT).new_text
    chunks = list(client.chat.completions.create(model=model_id, messages=CHAT, n=3, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, extra_body=NO_EOS))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert texts == {0: want_chat, 1: want_chat, 2: want_chat}
    finals = [c.choices[0] for c in chunks if c.choices[0].finish_reason]
    assert sorted(c.index for c in finals) == [0, 1, 2] and {c.finish_reason for c in finals} == {"length"}
    assert len({c.id for c in chunks}) == 1


def test_n_seeded_samples_differ_and_reproduce(client, model_dir):
    kwargs = dict(model=model_dir.name, prompt=PROMPTS[1], n=3, max_tokens=MAX_TOKENS, temperature=1.0, seed=7,
                  extra_body=NO_EOS)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == [c.text for c in client.completions.create(**kwargs).choices]
    assert len(set(first)) > 1  # seed + index per sample, as vLLM's child requests


def test_prompt_arrays_give_one_choice_per_prompt(client, engine, model_dir):
    model_id = model_dir.name
    want = [_greedy(engine, model_id, p).new_text for p in PROMPTS]
    got = client.completions.create(model=model_id, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=NO_EOS)
    assert [(c.index, c.text) for c in got.choices] == [(0, want[0]), (1, want[1])]
    ids = [engine.tokenize_request(model_id, prompt=p) for p in PROMPTS]
    got = client.completions.create(model=model_id, prompt=ids, n=2, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=NO_EOS)
    assert [c.text for c in got.choices] == [want[0], want[0], want[1], want[1]]  # prompt_index * n + sample
    assert got.usage.prompt_tokens == sum(len(i) for i in ids)


# -- logprobs and echo -------------------------------------------------------------------------
def _reference_logprobs(engine, model_id: str, prompt_ids: list[int], num_steps: int):
    """Greedy tokens and log-softmax of the engine's logits at each step."""
    tokens, rows = list(prompt_ids), []
    for _ in range(num_steps):
        logprobs = torch.log_softmax(_step_logits(engine, model_id, tokens).float(), dim=-1)
        rows.append(logprobs)
        tokens.append(int(logprobs.argmax()))
    return tokens[len(prompt_ids):], rows


def test_completion_logprobs_equal_log_softmax_of_the_engine_logits(client, engine, model_dir):
    model_id = model_dir.name
    tokenizer = engine.tokenizer(model_id)
    prompt_ids = engine.tokenize_request(model_id, prompt=PROMPTS[0])
    ids, rows = _reference_logprobs(engine, model_id, prompt_ids, MAX_TOKENS)
    got = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    logprobs=3, extra_body=NO_EOS).choices[0].logprobs
    assert got.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    for step, (token_id, row) in enumerate(zip(ids, rows, strict=True)):
        assert got.token_logprobs[step] == pytest.approx(float(row[token_id]), abs=1e-4)
        top_values, top_ids = torch.topk(row, 3)
        want_top = {tokenizer.decode([int(t)], skip_special_tokens=False): float(v) for t, v in zip(top_ids, top_values, strict=True)}
        for token, value in want_top.items():
            assert got.top_logprobs[step][token] == pytest.approx(value, abs=1e-4)
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]


def test_chat_logprobs_equal_log_softmax_of_the_engine_logits(client, engine, model_dir):
    model_id = model_dir.name
    prompt_ids = engine.tokenize_request(model_id, messages=CHAT)
    ids, rows = _reference_logprobs(engine, model_id, prompt_ids, MAX_TOKENS)
    got = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body=NO_EOS).choices[0].logprobs
    assert len(got.content) == MAX_TOKENS
    for item, token_id, row in zip(got.content, ids, rows, strict=True):
        assert item.logprob == pytest.approx(float(row[token_id]), abs=1e-4)
        assert item.bytes == list(item.token.encode("utf-8", "replace"))
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(torch.topk(row, 2).values.tolist(), abs=1e-4)
    streamed = list(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                   logprobs=True, stream=True, extra_body=NO_EOS))
    values = [i.logprob for c in streamed if c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert values == pytest.approx([float(row[t]) for t, row in zip(ids, rows, strict=True)], abs=1e-4)


def test_echo_prepends_the_prompt(client, engine, model_dir):
    model_id = model_dir.name
    want = _greedy(engine, model_id, PROMPTS[1]).new_text
    got = client.completions.create(model=model_id, prompt=PROMPTS[1], echo=True, max_tokens=MAX_TOKENS,
                                    temperature=0, extra_body=NO_EOS)
    assert got.choices[0].text == PROMPTS[1] + want
    ids = engine.tokenize_request(model_id, prompt=PROMPTS[1])
    prompt_text = engine.tokenizer(model_id).decode(ids, skip_special_tokens=False)
    chunks = list(client.completions.create(model=model_id, prompt=ids, echo=True, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == prompt_text + want


# -- penalties, logit_bias, min_tokens, JSON -----------------------------------------------------
def test_penalties_and_logit_bias_follow_a_reference_decoder(client, engine, model_dir):
    """Greedy with vLLM's penalties, computed here in plain Python over the engine's logits."""
    model_id = model_dir.name
    tokenizer = engine.tokenizer(model_id)
    rep, freq, pres, bias = 1.8, 0.9, 0.5, {17: 2.5, 40: -3.0}
    prompt_ids = engine.tokenize_request(model_id, prompt=PROMPTS[0])
    tokens = list(prompt_ids)
    for _ in range(MAX_TOKENS):
        logits = _step_logits(engine, model_id, tokens).tolist()
        output = tokens[len(prompt_ids):]
        for t, b in bias.items():
            logits[t] += b
        for t in set(tokens):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(output):
            logits[t] -= freq * output.count(t) + pres
        tokens.append(max(range(len(logits)), key=logits.__getitem__))
    got = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    logprobs=0, presence_penalty=pres, frequency_penalty=freq,
                                    logit_bias={str(t): b for t, b in bias.items()},
                                    extra_body={"repetition_penalty": rep, **NO_EOS})
    assert got.choices[0].logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False)
                                              for t in tokens[len(prompt_ids):]]


def test_min_tokens_suppresses_eos(client, engine, model_dir):
    model_id = model_dir.name
    eos = engine.tokenizer(model_id).eos_token_ids[0]
    forced = dict(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, logit_bias={str(eos): 100})
    assert client.completions.create(**forced).usage.completion_tokens == 1
    held = client.completions.create(**forced, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6
    stopped = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                        logit_bias={"33": 100}, extra_body={"stop_token_ids": [33]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "blue"]},
                                           "name": {"type": "string", "maxLength": 5}},
          "required": ["ok", "tag", "name"], "additionalProperties": False}


def _follows_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"ok", "tag", "name"} and isinstance(value["ok"], bool)
            and value["tag"] in ("red", "blue") and isinstance(value["name"], str) and len(value["name"]) <= 5)


def test_json_mode_output_parses_and_follows_its_schema(client, model_dir):
    model_id = model_dir.name
    response_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    for seed in (1, 2):
        got = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=200, temperature=1.0, seed=seed,
                                             response_format=response_format)
        assert got.choices[0].finish_reason == "stop"
        assert _follows_schema(json.loads(got.choices[0].message.content))
    got = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=300, temperature=0.7, seed=3,
                                    extra_body={"response_format": {"type": "json_object"}})
    if got.choices[0].finish_reason == "stop":  # a random model may still be inside a long string
        assert isinstance(json.loads(got.choices[0].text), dict)
    else:
        assert got.choices[0].text.startswith("{")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert info.value.body["param"] == "response_format"


# -- unknown fields, bad values, metrics -----------------------------------------------------
def test_unknown_fields_are_ignored_with_a_warning_header(client, engine, model_dir):
    model_id = model_dir.name
    raw = client.completions.with_raw_response.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                      temperature=0, extra_body={"bogus": 1, "vendor_x": {"a": 1}, **NO_EOS})
    assert raw.headers["X-Ignored-Fields"] == "bogus, vendor_x"
    assert raw.parse().choices[0].text == _greedy(engine, model_id, PROMPTS[0]).new_text
    plain = client.completions.with_raw_response.create(model=model_id, prompt=PROMPTS[0], max_tokens=1)
    assert "X-Ignored-Fields" not in plain.headers


@pytest.mark.parametrize("params,param", [
    ({"logit_bias": {"999999": 1}}, "logit_bias"),  # past the vocabulary: the worker knows it
    ({"n": 200}, "n"), ({"logprobs": 30}, "logprobs"), ({"presence_penalty": 5}, "presence_penalty"),
    ({"extra_body": {"repetition_penalty": -1}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": 99}}, "min_tokens"),
])
def test_bad_extras_are_400_naming_the_param(client, model_dir, params, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_dir.name, prompt="hi", max_tokens=4, **params)
    assert info.value.status_code == 400 and info.value.body["param"] == param


async def test_metrics_have_vllm_names(client, cluster, model_dir):
    client.completions.create(model=model_dir.name, prompt=PROMPTS[0], max_tokens=3)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/metrics") as resp:
            text = await resp.text()
    model = re.escape(model_dir.name)
    assert float(re.search(rf'c2c_prompt_tokens_total\{{model="{model}",worker="[^"]+"\}} ([0-9.e+]+)', text)[1]) > 0
    assert re.search(rf'c2c_request_prompt_tokens_count\{{model="{model}"\}} [1-9]', text)
    assert re.search(rf'c2c_request_generation_tokens_bucket\{{le="5.0",model="{model}"\}} [1-9]', text)
    assert re.search(rf'c2c_generation_tokens_total\{{model="{model}",worker="[^"]+"\}} [1-9]', text)
    def n_bucket(le: str) -> float:
        return float(re.search(rf'c2c_request_params_n_bucket\{{le="{le}",model="{model}"\}} ([0-9.e+]+)', text)[1])

    assert 0 < n_bucket("1.0") < n_bucket("5.0")  # requests with n = 1 and n = 2, 3 above
    usage = [float(v) for v in re.findall(r'c2c_kv_cache_usage_perc\{worker="[^"]+"\} ([0-9.e+-]+)', text)]
    assert len(usage) == 1 and 0.0 <= usage[0] <= 1.0 and not math.isnan(usage[0])


async def test_raw_sse_of_several_choices(cluster, engine, model_dir):
    """Completions stream, 2 prompts x n=2 with logprobs: every event names one choice, each
    choice's text and finish come in order, the usage event is last; text_offset counts from
    the text already streamed."""
    model_id = model_dir.name
    body = {"model": model_id, "prompt": PROMPTS, "n": 2, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["X-Request-Id"].startswith("cmpl-")
            raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    objs = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert len({o["id"] for o in objs}) == 1 and objs[-1]["choices"] == []
    assert objs[-1]["usage"]["completion_tokens"] == 4 * MAX_TOKENS
    texts, tokens, finishes = {}, {}, {}
    for obj in objs[:-1]:
        (choice,) = obj["choices"]
        i = choice["index"]
        assert i not in finishes, "a chunk after the choice's finish"
        if choice["logprobs"]:  # as vLLM streams: offsets from the text sent so far, token by token
            chunk_tokens = choice["logprobs"]["tokens"]
            base = len(texts.get(i, ""))
            assert choice["logprobs"]["text_offset"] == [base + sum(len(t) for t in chunk_tokens[:k])
                                                         for k in range(len(chunk_tokens))]
            tokens.setdefault(i, []).extend(chunk_tokens)
        texts[i] = texts.get(i, "") + choice["text"]
        if choice["finish_reason"]:
            finishes[i] = choice["finish_reason"]
    want = [_greedy(engine, model_id, p).new_text for p in PROMPTS]
    assert texts == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}
    assert finishes == dict.fromkeys(range(4), "length")
    assert all(len(tokens[i]) == MAX_TOKENS for i in range(4))
