"""bench/moe_permute.py (docs/benchmarks.md) on tiny.toml, on this machine's CPU: the
model's moves, the plain gathers and the scatters they replaced agree (on the CPU the
model runs the gathers, so bit for bit), and all three are timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_permutation_benchmark_checks_and_times_each_variant(tmp_path):
    out = tmp_path / "permute.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "moe_permute.py"), "--config",
                           str(ROOT / "trainer" / "configs" / "tiny.toml"), "--steps", "2",
                           "--sweep", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["agree"] is True and result["device"] == "cpu"
    assert list(result["ms"]) == ["model", "gather", "scatter"]
    assert result["difference"] == {"model": 0.0, "gather": 0.0, "scatter": 0.0}
    assert [(r["tile"], r["warps"]) for r in result["sweep"]] == [
        (tile, warps) for tile in (2048, 4096, 8192, 16384) for warps in (4, 8, 16)]
    assert all(r["forward+backward"] > 0 for r in result["sweep"])
    assert all(ms > 0 for times in result["ms"].values() for ms in times.values())
