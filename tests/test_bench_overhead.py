"""`c2cserve bench overhead` end to end at a tiny size: it runs, measures all three paths."""

from services.cli import main


def test_bench_overhead_command_runs(tiny_model, tmp_path, capsys):
    out = tmp_path / "overhead.txt"
    model = tiny_model("llama")
    assert main(["bench", "overhead", "--model", str(model), "--n", "3", "--warmup", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ c2cserve bench overhead")
    for row in ("HTTP -> gateway -> placer -> worker", "NATS -> worker", "Engine.generate in process",
                "added by the services"):
        assert row in text
    assert f"wrote {out}" in capsys.readouterr().out
