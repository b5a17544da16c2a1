"""bench/gpu_fp8.py's runs on the CPU (tiny.toml, a few steps): the run name's parts land
in the trained config, and each run's whole output is kept in its log, whether it trained
or stopped."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_fp8 as bench  # noqa: E402


def test_a_run_keeps_its_log_and_figures(tmp_path):
    log = tmp_path / "out-1.log"
    row = bench.run_one("tiny", {"training.micro_batch_size": 2}, 3, 1, tmp_path, 300, log)
    assert row["ok"], row
    assert (row["fp8"], row["fp8_experts"]) == ("off", "off")
    assert len(row["losses"]) == 3 and row["tokens_per_s"] > 0
    cfg = tomllib.loads((tmp_path / "tiny-off-off.toml").read_text())
    assert cfg["training"]["micro_batch_size"] == 2
    assert cfg["training"]["fp8_experts"] == "off"
    assert row["header"] in log.read_text()  # the trainer's output, kept


def test_a_refused_run_keeps_the_reason_in_its_log(tmp_path):
    log = tmp_path / "out-2.log"
    row = bench.run_one("tiny:off:rowwise", {}, 2, 0, tmp_path, 300, log)
    assert not row["ok"] and row["fp8_experts"] == "rowwise"
    assert "training.fp8_experts" in log.read_text() and "training.fp8_experts" in row["error"]
