"""Engine behaviour on tiny checkpoints: batching, chunking, paging, several models,
preemption, stop conditions, abort, seeded sampling, residency modes, bad input."""

import pytest

from services.errors import ContextLengthExceeded, ErrorCode, InvalidRequest, ModelNotFound
from worker.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = ["hello there", "the quick brown fox jumps over the lazy dog", "a", "one two three four five six"]


def make_engine(*models, **config):
    config = {"residency": "load", "block_size": 4, "kv_cache_bytes": 1 << 20, "num_threads": 1} | config
    engine = Engine(EngineConfig(**config))
    for model_id, model_dir in models:
        engine.add_model(model_id, model_dir)
    return engine


def run_all(engine, requests, params=GREEDY, on_step=None):
    """requests: [(request_id, model_id, prompt)] -> {request_id: (token_ids, text, finish_reason)}."""
    for request_id, model_id, prompt in requests:
        engine.add_request(request_id, model_id, prompt=prompt, params=params)
    results = {rid: ([], "", None) for rid, _, _ in requests}
    num_steps = 0
    while engine.has_work():
        for out in engine.step():
            ids, text, _ = results[out.request_id]
            results[out.request_id] = (ids + out.new_token_ids, text + out.new_text, out.finish_reason)
        num_steps += 1
        if on_step:
            on_step(engine, num_steps)
    return results


@pytest.fixture(scope="module")
def qwen(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def alone(qwen):
    """Each prompt run alone (block_size 16, whole prefill): the reference tokens."""
    engine = make_engine(("q", qwen), block_size=16)
    return {p: engine.generate("q", p, GREEDY).new_token_ids for p in PROMPTS}


def test_batched_requests_match_alone(qwen, alone):
    engine = make_engine(("q", qwen))  # block_size 4: KV pages cross block boundaries
    results = run_all(engine, [(f"r{i}", "q", p) for i, p in enumerate(PROMPTS)])
    for i, prompt in enumerate(PROMPTS):
        ids, _, reason = results[f"r{i}"]
        assert ids == alone[prompt] and reason == "length"


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 4096])
def test_chunked_prefill_gives_identical_tokens(qwen, alone, chunk_size):
    engine = make_engine(("q", qwen), chunk_size=chunk_size, max_num_batched_tokens=max(8, chunk_size))
    results = run_all(engine, [(f"r{i}", "q", p) for i, p in enumerate(PROMPTS)])
    assert [results[f"r{i}"][0] for i in range(len(PROMPTS))] == [alone[p] for p in PROMPTS]


def test_two_models_interleaved_match_each_alone(qwen, llama, alone):
    llama_alone = make_engine(("l", llama)).generate("l", PROMPTS[1], GREEDY).new_token_ids
    engine = make_engine(("q", qwen), ("l", llama))
    seen_models = []
    requests = [("q0", "q", PROMPTS[0]), ("l1", "l", PROMPTS[1]), ("q1", "q", PROMPTS[1])]
    results = run_all(engine, requests, on_step=lambda e, n: seen_models.append(e.scheduler.current_model))
    assert results["q0"][0] == alone[PROMPTS[0]] and results["q1"][0] == alone[PROMPTS[1]]
    assert results["l1"][0] == llama_alone
    assert {"q", "l"} <= set(seen_models)


def test_preemption_under_tiny_kv_budget_keeps_tokens(qwen, alone):
    # 12 blocks of 4 slots = 48 tokens: four requests of up to ~20 tokens cannot all stay.
    # No host KV tier: preemption by recompute (tests/test_rotation_engine.py rotates instead).
    tight = make_engine(("q", qwen), kv_cache_bytes=_kv_bytes(make_engine(("q", qwen)), "q", num_blocks=12),
                        host_kv_bytes=0)
    assert tight.runner.slots["q"].num_blocks == 12
    results = run_all(tight, [(f"r{i}", "q", p) for i, p in enumerate(PROMPTS)])
    assert tight.stats().num_preemptions > 0
    assert [results[f"r{i}"][0] for i in range(len(PROMPTS))] == [alone[p] for p in PROMPTS]


def _kv_bytes(engine, model_id, num_blocks):
    from worker.model import kv_bytes_per_token

    config = engine.runner.slots[model_id].config
    return num_blocks * engine.config.block_size * kv_bytes_per_token(config)


def test_text_stream_equals_decode_of_tokens(qwen):
    engine = make_engine(("q", qwen))
    ids, text, _ = run_all(engine, [("r", "q", PROMPTS[1])])["r"]
    assert text == engine.tokenizer("q").decode(ids)


def test_max_tokens_and_stop_token_ids(qwen, alone):
    engine = make_engine(("q", qwen))
    reference = alone[PROMPTS[1]]
    out = engine.generate("q", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert out.new_token_ids == reference[:3] and out.finish_reason == "length"
    stop_id = reference[4]
    first = reference.index(stop_id)
    out = engine.generate("q", PROMPTS[1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                          stop_token_ids=[stop_id]))
    assert out.new_token_ids == reference[: first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(qwen, alone):
    engine = make_engine(("q", qwen))
    reference = alone[PROMPTS[1]]
    eos = engine.tokenizer("q").eos_token_ids
    out = engine.generate("q", PROMPTS[1], SamplingParams(max_tokens=10, temperature=0))
    cut = next((i + 1 for i, t in enumerate(reference) if t in eos), len(reference))
    assert out.new_token_ids == reference[:cut]
    assert out.finish_reason == ("stop" if cut < len(reference) or reference[-1] in eos else "length")


def test_stop_string_truncates_text(qwen):
    engine = make_engine(("q", qwen))
    tokenizer = engine.tokenizer("q")
    full = engine.generate("q", PROMPTS[3], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    text = tokenizer.decode(full.new_token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and "\ufffd" not in stop
    out = engine.generate("q", PROMPTS[3], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                          stop=[stop, "never-appears-xyz"]))
    assert out.finish_reason == "stop"
    assert out.new_text == text[: text.index(stop)]
    assert len(out.new_token_ids) <= len(full.new_token_ids)


def test_abort_stops_one_request_only(qwen, alone):
    engine = make_engine(("q", qwen))
    engine.add_request("keep", "q", prompt=PROMPTS[0], params=GREEDY)
    engine.add_request("drop", "q", prompt=PROMPTS[1], params=GREEDY)
    outputs = engine.step() + engine.step()
    engine.abort("drop")
    kept = [t for o in outputs if o.request_id == "keep" for t in o.new_token_ids]
    finals = {}
    while engine.has_work():
        for out in engine.step():
            kept += out.new_token_ids if out.request_id == "keep" else []
            if out.finished:
                finals[out.request_id] = out
    assert finals["drop"].finish_reason == "abort" and finals["drop"].error_code == ErrorCode.ABORTED
    assert kept == alone[PROMPTS[0]]
    assert engine.stats().kv_used_frac == 0.0


def test_seeded_sampling_is_reproducible(qwen):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    engine = make_engine(("q", qwen))
    first = engine.generate("q", PROMPTS[0], params).new_token_ids
    assert engine.generate("q", PROMPTS[0], params).new_token_ids == first
    batched = run_all(make_engine(("q", qwen)), [("a", "q", PROMPTS[0]), ("b", "q", PROMPTS[1])], params)
    assert batched["a"][0] == first
    reseeded = [SamplingParams(**(vars(params) | {"seed": seed})) for seed in (99, 100, 101)]
    assert any(engine.generate("q", PROMPTS[0], p).new_token_ids != first for p in reseeded)


def test_chat_messages_use_the_template(qwen):
    engine = make_engine(("q", qwen))
    messages = [{"role": "user", "content": "hi"}]
    out = None
    engine.add_request("c", "q", messages=messages, params=GREEDY)
    while engine.has_work():
        for o in engine.step():
            out = o
    expected = len(engine.tokenizer("q").encode_chat(messages))
    assert out.finished and out.num_prompt_tokens == expected


def test_bad_input_is_rejected_and_engine_keeps_serving(qwen, alone):
    engine = make_engine(("q", qwen))
    window = engine.context_window("q")
    with pytest.raises(ContextLengthExceeded, match=str(window)):
        engine.add_request("long", "q", prompt_token_ids=[5] * window, params=GREEDY)
    with pytest.raises(ContextLengthExceeded, match=rf"{window - 5}.*\b{window}\b"):
        engine.add_request("long2", "q", prompt_token_ids=[5] * 10,
                           params=SamplingParams(max_tokens=window - 5))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request("empty", "q", prompt="", params=GREEDY)
    with pytest.raises(ModelNotFound):
        engine.add_request("nomodel", "nope", prompt="hi", params=GREEDY)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(max_tokens=0), dict(stop=[""])):
        with pytest.raises(InvalidRequest):
            engine.add_request("bad", "q", prompt="hi", params=SamplingParams(**bad))
    with pytest.raises(InvalidRequest):
        engine.add_request("badid", "q", prompt_token_ids=[10**9], params=GREEDY)
    assert not engine.has_work()
    assert engine.generate("q", PROMPTS[0], GREEDY).new_token_ids == alone[PROMPTS[0]]


def test_failing_model_fails_its_requests_only(tiny_model, qwen, alone, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("llama"), broken)
    engine = make_engine(("q", qwen), ("b", broken))
    (broken / "model.safetensors").write_bytes(b"corrupt")  # breaks its cold-start load
    results = {}
    engine.add_request("b1", "b", prompt=PROMPTS[0], params=GREEDY)
    engine.add_request("q1", "q", prompt=PROMPTS[0], params=GREEDY)
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    assert results["b1"][-1].finish_reason == "error" and results["b1"][-1].error
    assert results["b1"][-1].error_code == ErrorCode.INTERNAL
    assert [t for o in results["q1"] for t in o.new_token_ids] == alone[PROMPTS[0]]


def test_load_mode_cold_starts_and_lru_eviction(qwen, llama):
    import os

    size = os.path.getsize(qwen / "model.safetensors")
    engine = make_engine(("q", qwen), ("l", llama), load_budget_bytes=int(size * 1.5))
    first = engine.generate("q", PROMPTS[0], GREEDY)
    again = engine.generate("q", PROMPTS[0], GREEDY)
    assert first.cold_start and not again.cold_start
    assert engine.generate("l", PROMPTS[0], GREEDY).cold_start
    per_model = engine.stats().per_model
    assert per_model["l"].is_loaded and not per_model["q"].is_loaded  # q evicted (LRU, budget)
    back = engine.generate("q", PROMPTS[0], GREEDY)
    assert back.cold_start and back.new_token_ids == first.new_token_ids


def test_host_mode_maps_once_and_matches_load_mode(qwen, alone, host_store_root):
    engine = make_engine(("q", qwen), residency="host", host_store_root=str(host_store_root))
    first = engine.generate("q", PROMPTS[1], GREEDY)
    second = engine.generate("q", PROMPTS[1], GREEDY)
    assert first.cold_start and not second.cold_start
    assert first.new_token_ids == second.new_token_ids == alone[PROMPTS[1]]


def test_set_control_changes_chunking(qwen, alone):
    engine = make_engine(("q", qwen))
    engine.set_control(chunk_size=2, max_num_batched_tokens=4, decode_threshold=8)
    assert engine.scheduler.config.chunk_size == 2
    engine.add_request("r", "q", prompt=PROMPTS[1], params=GREEDY)
    batch = engine.scheduler.schedule()
    assert batch.num_new_tokens == [2]
    with pytest.raises(InvalidRequest):
        engine.set_control(chunk_size=0)


def test_bf16_checkpoint_runs_through_the_kernels(tiny_model):
    engine = make_engine(("b", tiny_model("qwen2", dtype="bfloat16")))
    results = run_all(engine, [(f"r{i}", "b", p) for i, p in enumerate(PROMPTS)])
    assert all(len(ids) == GREEDY.max_tokens and reason == "length" for ids, _, reason in results.values())


def test_generate_command_json(qwen, alone, capsys):
    import json

    from services.cli import main

    code = main(["generate", "--model", str(qwen), "--prompt", PROMPTS[0], "--max-tokens", "10",
                 "--ignore-eos", "--residency", "load", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["token_ids"] == alone[PROMPTS[0]]
    assert result["finish_reason"] == "length" and result["num_prompt_tokens"] > 0
    assert result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_generate_command_user_error_is_one_line(tmp_path, capsys):
    from services.cli import main

    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("c2cserve: error:") and "\n" not in err


def test_prewarm_and_evict(qwen, host_store_root):
    engine = make_engine(("q", qwen), residency="host", host_store_root=str(host_store_root))
    assert engine.prewarm("q") and not engine.prewarm("q")
    assert not engine.generate("q", PROMPTS[0], GREEDY).cold_start  # already mapped
    engine.add_request("busy", "q", prompt=PROMPTS[0], params=GREEDY)
    engine.step()
    assert not engine.evict("q")  # a running request uses it
    engine.abort("busy")
    engine.step()
    assert engine.evict("q") and not engine.stats().per_model["q"].is_loaded
    assert engine.generate("q", PROMPTS[0], GREEDY).cold_start


def test_bench_engine_command_runs(qwen, capsys):
    import json

    from services.cli import main

    assert main(["bench", "engine", "--model", str(qwen), "--batch-sizes", "1,2", "--prompt-len", "8",
                 "--decode-tokens", "3", "--no-hf", "--threads", "1", "--quantize", "none,q4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["batch"] for row in report["results"]] == [1, 2]
    assert all(row["ours"]["decode_tokens_per_s"] > 0 for row in report["results"])
    assert all(list(row["variants"]) == ["ours", "ours-q4"] for row in report["results"])
    assert report["weight_bytes"]["ours-q4"] < report["weight_bytes"]["ours"]


def test_bench_coldstart_command_runs(tiny_model, tmp_path, capsys):
    from services.cli import main

    out = tmp_path / "coldstart.txt"
    models = [str(tiny_model("llama")), str(tiny_model("mixtral"))]
    assert main(["bench", "coldstart", "--models", *models, "--rounds", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "host: a cold start adds" in text and "load: a cold start adds" in text
    assert text.count("\nhost  ") == 2 and text.count("\nload  ") == 2  # a row per model and mode


def test_cpu_slices_report_mapped_models_as_fully_warm(qwen):
    engine = Engine(EngineConfig())
    engine.add_model("q", qwen)
    assert engine.stats().cached_fraction == {}          # registered, not mapped yet
    engine.prewarm("q")
    assert engine.stats().cached_fraction == {"q": 1.0}  # no device cache: mapped is warm
    assert engine.evict("q") and engine.stats().cached_fraction == {}
