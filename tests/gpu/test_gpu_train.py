"""The trainer on a GPU: the grouped-GEMM experts against the per-expert loop, and a
compiled bf16 run whose loss falls and whose MFU is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.model.model import GroupedExperts

ROOT = Path(__file__).resolve().parents[2]
# a torch without torch._grouped_mm runs the experts one after another: nothing to test
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"),
                                      reason=f"torch {torch.__version__} has no grouped GEMM")


@needs_grouped_mm
def test_grouped_experts_match_the_per_expert_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 128)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.05)
    counts = torch.tensor([40, 0, 17, 64, 3, 0, 100, 32])
    x = torch.randn(int(counts.sum()), 256)
    reference = experts(x, counts)  # CPU: one expert after another, fp32
    gpu = experts.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(x.cuda(), counts.cuda())
    assert out.dtype == torch.bfloat16
    error = (out.float().cpu() - reference).abs().max() / reference.abs().max()
    assert error < 2e-2, float(error)



@needs_grouped_mm
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_expert_gradients_arrive_in_the_weights_layout(compiled):
    """w1 and w3 run as one grouped GEMM; each one's gradient must still reach autograd as
    a tensor of its own in the weight's layout, which autograd keeps as .grad as it is. A
    strided slice of the stacked gradient is copied again, a pass over every expert weight
    in every step."""
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 128).cuda()
    weights = {"w1": experts.w1, "w2": experts.w2, "w3": experts.w3}
    for w in weights.values():
        torch.nn.init.normal_(w, std=0.05)
    arrived = {}  # what autograd hands each weight (not the tensor: a reference to it
    # would itself stop autograd from keeping it as .grad)
    for name, w in weights.items():
        w.register_hook(lambda g, name=name: arrived.__setitem__(
            name, (g.dtype, g.stride(), g._is_view(), g.data_ptr())))
    counts = torch.tensor([40, 0, 17, 64, 3, 0, 100, 32], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda")
    fn = torch.compile(experts) if compiled else experts
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fn(x, counts)
    out.float().square().sum().backward()
    for name, w in weights.items():
        dtype, stride, is_view, ptr = arrived[name]
        assert dtype == w.dtype and stride == w.stride() and not is_view, \
            (name, dtype, stride, is_view)
        assert w.grad.data_ptr() == ptr, f"{name}'s gradient was copied"


def test_tiny_trains_compiled_in_bf16(tmp_path):
    cfg = tmp_path / "tiny.toml"
    text = (ROOT / "trainer" / "configs" / "tiny.toml").read_text()
    cfg.write_text(text.replace("[training]\n", "[training]\ncompile = true\n", 1))
    assert "compile = true" in cfg.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(cfg), "--out",
         str(tmp_path / "run"), "--steps", "30"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
    assert summary["mfu"] is not None and 0 < summary["mfu"] < 1, summary
    assert "bf16 on cuda" in proc.stdout


def test_a_profiled_step_says_where_the_gpu_idled(tmp_path):
    """--profile-step on a GPU: the kernel time is the kernels' alone (the step phases'
    device-side ranges left out, or busy would exceed the step), and the idle gaps are
    reported by length."""
    import re

    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config",
         str(ROOT / "trainer" / "configs" / "tiny.toml"), "--out", str(tmp_path / "run"),
         "--steps", "4", "--profile-step", "3"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("profile of step 3"))
    match = re.search(r"profile of step 3: ([\d.]+) ms, kernels ([\d.]+) ms \((\d+)%\)", line)
    assert match, line
    step_ms, kernel_ms = float(match[1]), float(match[2])
    assert 0 < kernel_ms <= step_ms, line
    assert re.search(r"GPU idle [\d.]+ ms per step: ", line), line
