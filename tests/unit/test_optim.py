"""The optimizer the trainer builds: AdamW with weight decay on matrices only, the
warmup-then-cosine schedule, and trainer/adamw.py's AdamW where the fused kernel applies
(its Triton update is compared to torch's on the GPU: tests/gpu/test_gpu_adamw.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer import adamw
from trainer.config import load_config
from trainer.model import Transformer
from trainer.optim import build_optimizer, lr_factor

ROOT = Path(__file__).resolve().parents[2]


def test_lr_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_cpu_model_gets_torchs_adamw_with_decay_on_matrices_only():
    cfg = load_config(ROOT / "trainer" / "configs" / "tiny.toml")
    model = Transformer(cfg.model)
    opt, _ = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.training.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])


def test_where_the_kernel_cannot_run_torchs_fused_step_runs():
    """On the CPU (no Triton kernel there) trainer.adamw.AdamW is torch's fused AdamW,
    grad_scale included, to the bit."""
    torch.manual_seed(0)
    base = [torch.randn(5, 7), torch.randn(11)]
    mine = [torch.nn.Parameter(t.clone()) for t in base]
    ref = [torch.nn.Parameter(t.clone()) for t in base]
    opt = adamw.AdamW([{"params": mine, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    expected = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], lr=1e-2,
                                 betas=(0.9, 0.95), fused=True)
    assert opt.defaults["fused"]
    for i in range(3):
        for a, b in zip(mine, ref, strict=True):
            a.grad = torch.full_like(a, 0.5 * (i + 1))
            b.grad = a.grad.clone()
        for o in (opt, expected):
            o.grad_scale = torch.tensor(2.0 + i)
            o.step()
    for a, b in zip(mine, ref, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], expected.state[b]["exp_avg_sq"])


def test_adamw_benchmark_imports_and_says_when_there_is_no_gpu():
    """bench/adamw.py (the AdamW timings in docs/benchmarks.md) runs only on a GPU; here
    its imports from the trainer and bench.fp8_kernels must still resolve."""
    import os
    import subprocess
    import sys

    # any GPU of this machine hidden from the script, which would otherwise measure
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "adamw.py"), "--config", "tiny"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
