"""bench/moe_permute.py (docs/benchmarks.md) on tiny.toml, on this machine's CPU: the
model's moves, the plain gathers and the scatters they replaced agree (on the CPU the
model runs the gathers, so bit for bit), and all three are timed."""

from __future__ import annotations

from helpers import TINY_CONFIG, run_bench


def test_the_permutation_benchmark_checks_and_times_each_variant(tmp_path):
    _, result = run_bench(tmp_path, "moe_permute.py", "--config", TINY_CONFIG, "--steps", "2",
                          "--sweep")
    assert result["agree"] is True and result["device"] == "cpu"
    assert list(result["ms"]) == ["model", "gather", "scatter"]
    assert result["difference"] == {"model": 0.0, "gather": 0.0, "scatter": 0.0}
    assert [(r["tile"], r["warps"]) for r in result["sweep"]] == [
        (tile, warps) for tile in (2048, 4096, 8192, 16384) for warps in (4, 8, 16)]
    assert all(r["forward+backward"] > 0 for r in result["sweep"])
    assert all(ms > 0 for times in result["ms"].values() for ms in times.values())
