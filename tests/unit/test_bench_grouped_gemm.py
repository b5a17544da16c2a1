"""bench/grouped_gemm.py: the FP8 operands it times are laid out as
torch._scaled_grouped_mm takes them (its shape and layout checks, run on meta tensors:
no GPU needed), and without a GPU the script says so and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import grouped_gemm  # noqa: E402


@pytest.mark.skipif(not hasattr(torch, "_scaled_grouped_mm"), reason="no _scaled_grouped_mm")
@pytest.mark.parametrize("k, n", [(2048, 2816), (1408, 2048)])
def test_fp8_operands_pass_the_grouped_gemm_checks(k, n):
    groups, rows = 8, 8 * 32
    offs = torch.arange(32, rows + 1, 32, dtype=torch.int32, device="meta")
    w = torch.empty(groups, n, k, dtype=torch.bfloat16, device="meta")
    x = torch.empty(rows, k, dtype=torch.bfloat16, device="meta")
    dy = torch.empty(rows, n, dtype=torch.bfloat16, device="meta")
    for gemm, ((op, *args), fp8) in grouped_gemm.fp8_operands(w, x, dy).items():
        expected = op(*args, offs=offs).shape
        got = torch._scaled_grouped_mm(*fp8, offs=offs, out_dtype=torch.bfloat16).shape
        assert got == expected, gemm
    assert expected == (groups, n, k)  # the weight gradient, as the weights: (E, out, in)


def test_without_a_gpu_it_says_so_and_exits_0():
    # any GPU of this machine hidden from the script, which would otherwise measure
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "grouped_gemm.py"),
                           "--cases", "fp8"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0 and "no CUDA GPU" in proc.stdout, proc.stdout + proc.stderr
