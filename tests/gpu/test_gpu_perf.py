"""trainer.probes.gpu_perf on the real GPUs: every device measured, plausible figures."""

from __future__ import annotations

import json

import pytest

from trainer.probes import gpu_perf

pytestmark = pytest.mark.gpu


def test_gpu_perf_measures_every_device(gpu_out):
    import torch

    result = gpu_perf.measure(warmup=5, iters=20)
    (gpu_out / "gpu_perf.json").write_text(json.dumps(result, indent=2) + "\n")
    assert result["device"] == "cuda"
    assert [d["index"] for d in result["devices"]] == list(range(torch.cuda.device_count()))
    for device in result["devices"]:
        # Below any data-centre GPU of the last decade, above any plausible timing error.
        assert 5 < device["matmul_tflops"] < 5000, device
        assert 100 < device["copy_gbs"] < 20000, device


def test_main_writes_the_result_file(tmp_path):
    assert gpu_perf.main(["--size", "1024", "--copy-mib", "64", "--iters", "3",
                          "--json-out", str(tmp_path / "gpu_perf.json")]) == 0
    data = json.loads((tmp_path / "gpu_perf.json").read_text())
    assert data["matmul"]["size"] == 1024 and data["devices"]
