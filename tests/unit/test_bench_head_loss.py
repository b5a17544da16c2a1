"""bench/head_loss.py (docs/benchmarks.md) on tiny.toml, on this machine's CPU: the head's
loss op and the head as a matmul and F.cross_entropy agree, and both are timed, with the
loss-and-gradient pass alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_head_loss_benchmark_checks_and_times_both_variants(tmp_path):
    out = tmp_path / "head_loss.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "head_loss.py"), "--config",
                           str(ROOT / "trainer" / "configs" / "tiny.toml"), "--micro-batch",
                           "2", "--seq-len", "64", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["agree"] is True and result["device"] == "cpu"
    assert result["tokens"] == 128 and result["errors"]["loss"] < 1e-5
    assert list(result["ms"]) == ["op", "cross_entropy"]
    assert all(ms > 0 for ms in result["ms"].values())
    assert list(result["pass"]) == ["as chosen"] and "gb_per_s" in result["pass"]["as chosen"]
