"""bench/allreduce_side_by_side.py: all_reduce_perf gets the arguments validate gives it and
its table is read back; the Markdown table puts each probe beside nccl-tests with the lower
of its two modes' ratios; without a GPU the script runs the probe over gloo and says that
nccl-tests could not run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "gpu" / "all_reduce_perf_8gpu.txt"
sys.path.insert(0, str(ROOT / "bench"))

import allreduce_side_by_side as bench  # noqa: E402

ARGS = argparse.Namespace(begin="1M", end="8G", factor=16, warmup=5, iters=20, timeout=60)


def test_all_reduce_perf_gets_validates_arguments(tmp_path):
    fake = tmp_path / "all_reduce_perf"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\ncat {FIXTURE}\n')
    fake.chmod(0o755)
    parsed = bench.run_nccl_tests(str(fake), 8, ARGS)
    assert (tmp_path / "argv").read_text().split() == \
        "-b 1M -e 8G -f 16 -g 8 -w 5 -n 20".split()
    assert parsed["world_size"] == 8
    assert [r["size"] for r in parsed["results"]] == [1 << 20, 16 << 20, 256 << 20, 8 << 30]
    assert parsed["command"].startswith(f"test -x {fake} ")


def test_a_missing_all_reduce_perf_is_a_skip(tmp_path):
    missing = str(tmp_path / "all_reduce_perf")
    assert bench.run_nccl_tests(missing, 2, ARGS) == {
        "skipped": f"all_reduce_perf not installed ({missing})"}
    assert bench.run_nccl_tests(missing, 0, ARGS) == {"skipped": "no CUDA GPU"}


def test_the_table_puts_each_probe_beside_nccl_tests():
    from dsk_provision.validation.parsers import parse_nccl_tests

    nccl = parse_nccl_tests(FIXTURE.read_text())
    direct = json.loads(json.dumps(nccl)) | {"api": "libnccl"}
    through_torch = json.loads(json.dumps(nccl)) | {"api": "torch.distributed"}
    through_torch["results"][0]["out_of_place"]["busbw_gbs"] = 20.335  # half of 40.67
    through_torch["results"][0]["in_place"]["busbw_gbs"] = 36.864  # 90% of 40.96
    del through_torch["results"][-1]
    lines = bench.table(nccl, {"libnccl": direct, "torch": through_torch}).splitlines()
    assert lines[0] == ("| size (B) | nccl-tests out | nccl-tests in | libnccl out | libnccl in "
                        "| vs nccl-tests | torch.distributed out | torch.distributed in "
                        "| vs nccl-tests |")
    assert lines[2] == "| 1048576 | 40.7 | 41.0 | 40.7 | 41.0 | 100% | 20.3 | 36.9 | 50% |"
    assert lines[-1] == "| 8589934592 | 385.9 | 386.4 | 385.9 | 386.4 | 100% | - | - | - |"


def test_without_a_gpu_the_probe_runs_over_gloo(tmp_path):
    out = tmp_path / "allreduce.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "allreduce_side_by_side.py"), "--begin", "1K",
         "--end", "4K", "--factor", "4", "--warmup", "1", "--iters", "2", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nccl-tests: skipped (no CUDA GPU)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["gpus"] == 0 and result["nproc"] == 2
    assert list(result["probe"]) == ["torch"]
    probe = result["probe"]["torch"]
    assert probe["backend"] == "gloo" and probe["world_size"] == 2
    assert [r["size"] for r in probe["results"]] == [1024, 4096]
    assert probe["wrong_total"] == 0
