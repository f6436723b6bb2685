"""KV tier telemetry: the engine's counters reach the worker's state record and the
gateway's /metrics as c2c_kv_* series."""

from gateway.metrics import GatewayMetrics
from services.schemas import WorkerState, decode, encode


def _samples(metrics: GatewayMetrics) -> dict[str, float]:
    lines = metrics.render().decode().splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines
                                                   if line.startswith("c2c_kv_") and not line.startswith("#"))}


def test_kv_tier_series_per_worker_and_tier():
    state = WorkerState("w1", kv_device_blocks_used=5, kv_host_blocks_used=3, kv_swaps_out=2, kv_swaps_in=1,
                        kv_swap_out_bytes=200, kv_swap_in_bytes=100, kv_rotation_stalls=1)
    metrics = GatewayMetrics()
    metrics.kv_tiers.observe(decode(WorkerState, encode(state)))  # as it comes over the wire
    samples = _samples(metrics)
    assert samples['c2c_kv_blocks{tier="device",worker="w1"}'] == 5
    assert samples['c2c_kv_blocks{tier="host",worker="w1"}'] == 3
    assert samples['c2c_kv_swaps_total{direction="out",worker="w1"}'] == 2
    assert samples['c2c_kv_swaps_total{direction="in",worker="w1"}'] == 1
    assert samples['c2c_kv_swap_bytes_total{direction="out",worker="w1"}'] == 200
    assert samples['c2c_kv_rotation_stalls_total{worker="w1"}'] == 1


def test_every_kv_tier_field_of_the_state_comes_from_an_engine_stat():
    import dataclasses

    from worker.engine import EngineStats
    from worker.engine_loop import _KV_TIER_STATS

    engine_fields = {f.name for f in dataclasses.fields(EngineStats)}
    state_fields = set(WorkerState.__struct_fields__)
    assert {f for f in state_fields if f.startswith("kv_") and f != "kv_free_frac"} == {f for f, _ in _KV_TIER_STATS}
    assert {name for _, name in _KV_TIER_STATS} <= engine_fields
