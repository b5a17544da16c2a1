"""bench/mla_rope.py (docs/benchmarks.md) on tiny.toml, on this machine's CPU: the model's
attention inputs agree with the expression computed in fp32, and both variants are timed
alone and inside the compiled attention layer, with the sweep's every pair."""

from __future__ import annotations

from helpers import TINY_CONFIG, run_bench


def test_the_rope_benchmark_checks_and_times_each_variant(tmp_path):
    proc, result = run_bench(tmp_path, "mla_rope.py", "--config", TINY_CONFIG, "--steps", "2",
                             "--sweep")
    assert result["device"] == "cpu" and result["kernel"] is False
    assert result["agree"] is True and 0 < result["difference"] < 1e-2
    assert "both variants are the expression" in proc.stdout
    assert list(result["ms"]) == ["model", "expression"]
    assert all(list(times) == ["forward", "forward+backward", "layer forward+backward"]
               and all(ms > 0 for ms in times.values()) for times in result["ms"].values())
    assert [(r["tile"], r["warps"]) for r in result["sweep"]] == [
        (tile, warps) for tile in (1024, 2048, 4096, 8192, 16384) for warps in (2, 4, 8)]
