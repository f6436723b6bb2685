"""services/slo.py: request classes over per-model defaults, parsed at the edge."""

from __future__ import annotations

import json

import pytest

from gateway import openai_api
from services import catalog, slo
from services.errors import CheckpointError, InvalidRequest
from services.schemas import ModelEntry, RequestKind


def test_class_scales_the_model_default_and_the_request_class_wins():
    assert slo.resolve(None) == slo.SLOTarget("standard", slo.DEFAULT_TTFT_SLO_MS, slo.DEFAULT_TPOT_SLO_MS)
    assert slo.resolve("interactive") == slo.SLOTarget("interactive", 500.0, 100.0)
    assert slo.resolve(None, "batch", 2000.0, 100.0) == slo.SLOTarget("batch", 60000.0, 500.0)
    assert slo.resolve("interactive", "batch", 2000.0, 100.0) == slo.SLOTarget("interactive", 1000.0, 50.0)


def test_apply_writes_the_request_in_place():
    req = openai_api.parse_request(RequestKind.COMPLETION, {"model": "m", "prompt": "hi", "slo_class": "batch"})
    target = slo.apply(req.submit, ModelEntry("m", "/x", ttft_slo_ms=400.0, tpot_slo_ms=40.0))
    assert (req.submit.slo_class, req.submit.ttft_slo_ms, req.submit.tpot_slo_ms) == ("batch", 12000.0, 200.0)
    assert target.slo_class == "batch"
    plain = openai_api.parse_request(RequestKind.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    slo.apply(plain.submit, ModelEntry("m", "/x", slo_class="interactive"))
    assert (plain.submit.slo_class, plain.submit.ttft_slo_ms) == ("interactive", 500.0)


@pytest.mark.parametrize("value", ["urgent", "", 3, ["batch"], {"a": 1}, True])
def test_bad_class_is_a_400_naming_the_parameter(value):
    with pytest.raises(InvalidRequest) as info:
        openai_api.parse_request(RequestKind.COMPLETION, {"model": "m", "prompt": "hi", "slo_class": value})
    assert info.value.param == "slo_class"


def test_catalog_reads_the_models_serving_defaults(tiny_model, tmp_path):
    src = tiny_model("llama")
    model_dir = tmp_path / "with-slo"
    model_dir.mkdir()
    for path in src.iterdir():
        (model_dir / path.name).symlink_to(path)
    assert catalog.entry_for(model_dir).slo_class == ""
    (model_dir / catalog.SERVING_FILE).write_text(json.dumps({"slo_class": "batch", "ttft_slo_ms": 5000}))
    entry = catalog.entry_for(model_dir)
    assert (entry.slo_class, entry.ttft_slo_ms, entry.tpot_slo_ms) == ("batch", 5000.0, 0.0)
    back = catalog._from_hash(catalog.to_hash(entry))
    assert (back.slo_class, back.ttft_slo_ms) == ("batch", 5000.0)
    for bad in ({"slo_class": "fast"}, {"ttft_slo_ms": -1}, {"ttft_slo_ms": "5"}, {"deadline": 1}, [1]):
        (model_dir / catalog.SERVING_FILE).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=catalog.SERVING_FILE):
            catalog.entry_for(model_dir)
