"""bench/router_topk.py (docs/benchmarks.md) on tiny.toml, on this machine's CPU: both
variants choose the same experts (on the CPU both are torch.topk, so the same indices),
and each is timed alone and in the compiled gate, with the sweep's every pair."""

from __future__ import annotations

from helpers import TINY_CONFIG, run_bench


def test_the_router_benchmark_checks_and_times_each_variant(tmp_path):
    proc, result = run_bench(tmp_path, "router_topk.py", "--config", TINY_CONFIG,
                             "--steps", "2", "--sweep")
    assert result["device"] == "cpu" and result["kernel"] is False
    assert result["agree"] is True and result["same_indices"] is True
    assert "both variants are torch.topk" in proc.stdout
    assert list(result["ms"]) == ["model", "topk"]
    assert all(ms > 0 for times in result["ms"].values() for ms in times.values())
    assert [(r["rows"], r["warps"]) for r in result["sweep"]] == [
        (rows, warps) for rows in (16, 32, 64, 128, 256) for warps in (1, 2, 4, 8)]
