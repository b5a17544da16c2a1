"""trainer.probes.allreduce on this machine's GPUs, through ncclAllReduce called directly and
through torch.distributed: both sum correctly in both modes, and auto takes libnccl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("api, expected", [("auto", "libnccl"), ("libnccl", "libnccl"),
                                           ("torch", "torch.distributed")])
def test_the_probe_sums_right_through_each_api(api, expected, gpu_out):
    import torch

    out = gpu_out / f"allreduce_{api}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={torch.cuda.device_count()}", "-m", "trainer.probes.allreduce",
         "--begin", "1M", "--end", "16M", "--factor", "4", "--warmup", "2", "--iters", "5",
         "--dtype", "bfloat16", "--api", api, "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["api"] == expected and result["api_note"] is None
    assert result["backend"] == "nccl"
    assert result["world_size"] == torch.cuda.device_count()
    assert result["nccl"].startswith("2.")
    assert [r["size"] for r in result["results"]] == [1 << 20, 4 << 20, 16 << 20]
    assert result["wrong_total"] == 0
    for row in result["results"]:
        for mode in ("out_of_place", "in_place"):
            assert row[mode]["time_us"] > 0
