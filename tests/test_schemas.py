"""Wire schemas, subjects, Redis keys and config: round trips and the rules they keep."""

from __future__ import annotations

import argparse
import dataclasses

import msgspec
import pytest

from services import keys, schemas, subjects
from services.config import GatewayConfig, WorkerConfig, add_config_arguments, load_config
from services.errors import C2CError, ErrorCode
from services.schemas import (
    AbortRequest,
    ControlUpdate,
    FinishReason,
    RequestKind,
    ResidencyAction,
    ResidencyCommand,
    SubmitRequest,
    TokenChunk,
    WorkerState,
)

MESSAGES = [
    SubmitRequest("r1", "m", kind=RequestKind.CHAT, messages=[{"role": "user", "content": "hé"}],
                  stop=["\n"], seed=3, temperature=0.0, resumed_token_ids=[1, 2]),
    TokenChunk("r1", "w0", [5, 6], "ab", FinishReason.LENGTH, 3, 2, cold_start=True),
    TokenChunk("r1", finish_reason=FinishReason.ERROR, error_code=ErrorCode.NO_CAPACITY, error="full"),
    AbortRequest("r1"),
    WorkerState("w0", models=["m"], cached_fraction={"m": 0.5}, num_running=2, ttft_p50_ms=12.5),
    ControlUpdate("w0", chunk_size=128, decode_threshold=8),
    ResidencyCommand("w0", ResidencyAction.PREWARM, "m", 0.25),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert schemas.decode(type(message), schemas.encode(message)) == message


def test_hot_messages_are_compact_arrays():
    payload = schemas.encode(TokenChunk("r1", "w0", [7], "x"))
    assert msgspec.msgpack.decode(payload)[:4] == ["r1", "w0", [7], "x"]  # by position, no names
    assert len(payload) < 38  # 20 fields: a 3-byte array16 header (fixarray holds 15), one byte per default


def test_appended_fields_stay_compatible():
    class OldChunk(msgspec.Struct, array_like=True):
        request_id: str
        worker_id: str
        token_ids: list[int]
        text: str

    chunk = schemas.decode(TokenChunk, msgspec.msgpack.encode(OldChunk("r", "w", [1], "t")))
    assert chunk.finish_reason == FinishReason.NONE and chunk.error_code == 0


def test_enums_travel_as_ints_and_bad_payloads_raise():
    assert msgspec.msgpack.decode(schemas.encode(TokenChunk("r", finish_reason=FinishReason.STOP)))[4] == 1
    with pytest.raises(msgspec.ValidationError):
        schemas.decode(TokenChunk, msgspec.msgpack.encode(["r", "w", "not a list"]))
    with pytest.raises(msgspec.DecodeError):
        schemas.decode(SubmitRequest, b"\xc1")


def test_control_update_knobs_only_set_values():
    assert ControlUpdate("w", chunk_size=64).knobs() == {"chunk_size": 64}
    # the controller's rho cap reaches the engine as its "rho" knob
    assert ControlUpdate("w", chunk_size=64, rho_cap=0.5).knobs() == {"chunk_size": 64, "rho": 0.5}


def test_subjects_and_keys():
    assert subjects.worker_submit("w1") == "c2c.worker.w1.submit"
    assert subjects.worker_abort("w1") == "c2c.worker.w1.abort"
    assert subjects.telemetry("w1") == "c2c.telemetry.w1"
    assert subjects.worker_id_of(subjects.control("w1")) == "w1"
    inbox = subjects.gateway_inbox("gw", "cmpl-1")
    assert subjects.request_id_of_inbox(inbox) == "cmpl-1"
    for bad in ("a.b", "a b", "*", ">", ""):
        with pytest.raises(ValueError):
            subjects.worker_submit(bad)
    assert keys.worker("w1") == "c2c:worker:w1" and keys.worker_id_of(keys.worker("a:b")) == "a:b"
    assert keys.request("r") == "c2c:req:r" and keys.model("m") == "c2c:model:m"


def test_config_precedence_flag_env_default():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GatewayConfig)
    env = {"C2C_PORT": "9001", "C2C_API_KEY": "k"}
    assert load_config(GatewayConfig, parser.parse_args([]), env, log_it=False).port == 9001
    config = load_config(GatewayConfig, parser.parse_args(["--port", "9002"]), env, log_it=False)
    assert config.port == 9002 and config.api_key == "k"
    assert load_config(GatewayConfig, None, {}, log_it=False).port == 8000
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1


@pytest.mark.parametrize("env,name", [
    ({"C2C_PORT": "eighty"}, "C2C_PORT"),
    ({"C2C_RESIDENCY": "cloud"}, "C2C_RESIDENCY"),
    ({"C2C_NATS_URL": "http://x"}, "C2C_NATS_URL"),
])
def test_bad_config_names_the_variable(env, name):
    cls = WorkerConfig if "RESIDENCY" in name else GatewayConfig
    with pytest.raises(C2CError, match=name):
        load_config(cls, None, env, log_it=False)


def test_pinned_models_from_env():
    config = load_config(WorkerConfig, None, {"C2C_WORKER_MODELS": "a, b,"}, log_it=False)
    assert config.pinned_models == ["a", "b"]


def test_cpu_slices_split_cores_without_overlap():
    from worker.slices import cpu_slices, discover_slices

    specs = cpu_slices(3, cpu_ids=list(range(7)), node="n")
    assert [s.cpu_ids for s in specs] == [(0, 1), (2, 3), (4, 5, 6)]
    assert {s.gpu for s in specs} == {"n-cpu"} and [s.name for s in specs] == ["cpu0", "cpu1", "cpu2"]
    assert len(cpu_slices(4, cpu_ids=[0, 1])) == 4  # more slices than cores: shared, still one each
    assert discover_slices("cpu", 2)[1].backend == "cpu"
