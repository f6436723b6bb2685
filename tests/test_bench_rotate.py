"""`c2cserve bench rotate --json` end to end at a tiny size: every mode, the fields asked for."""

import json

from services.cli import main

TINY = ["--decodes", "2", "--decode-prompt", "40", "--decode-tokens", "24", "--burst", "2", "--burst-prompt", "40",
        "--burst-tokens", "4", "--burst-after", "8", "--kv-blocks", "10", "--rounds", "1", "--threads", "1"]


def test_bench_rotate_json_has_every_mode(tiny_model, tmp_path, capsys):
    out = tmp_path / "rotate.json"
    assert main(["bench", "rotate", "--model", str(tiny_model("llama")), *TINY, "--json", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("c2cserve bench rotate")
    assert set(result["modes"]) == {"recompute", "recompute_slo", "rotation"}
    for row in result["modes"].values():
        assert 0.0 <= row["ttft_attainment"] <= 1.0
        assert row["tpot_p99_s"] > 0 and row["output_tokens_per_s"] > 0
    assert result["modes"]["recompute"]["num_swaps_out"] == result["modes"]["recompute_slo"]["num_swaps_out"] == 0
    assert json.loads(capsys.readouterr().out.split("wrote ")[0]) == result
