"""bench/head_loss.py (docs/benchmarks.md) on tiny.toml, on this machine's CPU: the head's
loss op and the head as a matmul and F.cross_entropy agree, and both are timed, with the
loss-and-gradient pass alone."""

from __future__ import annotations

from helpers import TINY_CONFIG, run_bench


def test_the_head_loss_benchmark_checks_and_times_both_variants(tmp_path):
    _, result = run_bench(tmp_path, "head_loss.py", "--config", TINY_CONFIG, "--micro-batch",
                          "2", "--seq-len", "64", "--steps", "2")
    assert result["agree"] is True and result["device"] == "cpu"
    assert result["tokens"] == 128 and result["errors"]["loss"] < 1e-5
    assert list(result["ms"]) == ["op", "cross_entropy"]
    assert all(ms > 0 for ms in result["ms"].values())
    assert list(result["pass"]) == ["as chosen"] and "gb_per_s" in result["pass"]["as chosen"]
