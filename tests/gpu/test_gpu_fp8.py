"""FP8 training (training.fp8) on a GPU with FP8 matmuls: the FP8 grouped experts
(float8.Float8GroupedExperts) against the bf16 ones, and a few training steps whose losses
stay within tolerance of bf16's.
Skipped, saying why, without CUDA (conftest), without torchao, or on a GPU older than
compute capability 8.9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# a model small enough to train in seconds, with every width a multiple of 16 so that
# all of its block linears and experts run in FP8
MODEL = """[model]
vocab_size = 2048
dim = 512
inter_dim = 1024
moe_inter_dim = 256
n_layers = 3
n_dense_layers = 1
n_heads = 8
n_routed_experts = 16
n_shared_experts = 1
n_activated_experts = 4
score_func = "sigmoid"
kv_lora_rank = 128
qk_nope_head_dim = 32
qk_rope_head_dim = 32
v_head_dim = 32
max_seq_len = 512
mtp_depth = 1

[training]
steps = 30
seq_len = 512
micro_batch_size = 8
lr = 1e-3
warmup_steps = 5
seed = 0
compile = {compile}
fp8 = "{fp8}"
fp8_experts = "{experts}"

[data]
kind = "synthetic"
synthetic_branching = 2
"""


def _fp8_gpu():
    pytest.importorskip("torchao", reason="torchao is not installed (the trainer extra pins it)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"{torch.cuda.get_device_name()} has no FP8 matmuls (capability < 8.9)")


def _train(tmp_path: Path, fp8: str, compile: bool, steps: int = 30,
           experts: str = "off") -> list[float]:
    cfg = tmp_path / f"{fp8}-{experts}-{compile}.toml"
    cfg.write_text(MODEL.format(fp8=fp8, experts=experts, compile=str(compile).lower()))
    out = tmp_path / f"run-{fp8}-{experts}-{compile}"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(cfg), "--out", str(out),
         "--steps", str(steps)],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if fp8 != "off":  # the block linears in FP8, the head in bf16
        line = next(x for x in proc.stdout.splitlines() if x.startswith("fp8 ("))
        assert int(line.split(": ")[1].split()[0]) > 0 and "output" in line, line
    if experts != "off":  # the routed experts of both MoE layers and of the MTP block
        line = next(x for x in proc.stdout.splitlines() if x.startswith("fp8 experts ("))
        assert line.split(": ")[1].startswith("3 routed experts"), line
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fp8_grouped_experts_match_bf16():
    _fp8_gpu()
    from trainer.model.model import GroupedExperts
    from trainer.parallel.float8 import Float8GroupedExperts, grouped_fp8_available

    if not grouped_fp8_available(torch.device("cuda")):
        pytest.skip("no FP8 grouped GEMM for this GPU and torch")
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 128).cuda()
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.05)
    counts = torch.tensor([40, 0, 17, 64, 3, 0, 100, 33], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = experts(x, counts)
    ref.float().square().sum().backward()
    ref_grads = [t.grad.clone() for t in (x, experts.w1, experts.w2, experts.w3)]
    for t in (x, experts.w1, experts.w2, experts.w3):
        t.grad = None
    experts.__class__ = Float8GroupedExperts
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = experts(x, counts)
    out.float().square().sum().backward()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(out, ref) < 0.08, rel(out, ref)
    for got, want in zip((x.grad, experts.w1.grad, experts.w2.grad, experts.w3.grad),
                         ref_grads, strict=True):
        assert torch.isfinite(got).all()
        assert rel(got, want) < 0.15, rel(got, want)


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory) -> list[float]:
    _fp8_gpu()
    return _train(tmp_path_factory.mktemp("bf16"), "off", compile=False)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_loss_follows_bf16(tmp_path, recipe, bf16_losses):
    bf16 = bf16_losses
    fp8 = _train(tmp_path, recipe, compile=False)
    assert bf16[-1] < bf16[0] - 1.0, bf16  # it learns
    worst = max(abs(a - b) / b for a, b in zip(fp8, bf16, strict=True))
    tail = sum(fp8[-5:]) / sum(bf16[-5:]) - 1
    print(f"{recipe}: worst step {worst:.4f}, last 5 steps {tail:+.4f}")
    assert worst < 0.05, (fp8, bf16)
    assert abs(tail) < 0.02, (fp8, bf16)


def test_fp8_trains_compiled(tmp_path):
    _fp8_gpu()
    bf16 = _train(tmp_path, "off", compile=True, steps=12)
    fp8 = _train(tmp_path, "tensorwise", compile=True, steps=12)
    assert abs(fp8[-1] - bf16[-1]) / bf16[-1] < 0.03, (fp8, bf16)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fp8_experts_loss_follows_bf16(tmp_path, compile, bf16_losses, fp8_grouped_gpu):
    steps = 30 if not compile else 12
    bf16 = bf16_losses if not compile else _train(tmp_path, "off", compile=True, steps=steps)
    fp8 = _train(tmp_path, "off", compile=compile, steps=steps, experts="rowwise")
    worst = max(abs(a - b) / b for a, b in zip(fp8, bf16, strict=True))
    tail = sum(fp8[-5:]) / sum(bf16[-5:]) - 1
    print(f"fp8 experts ({'compiled' if compile else 'eager'}): worst step {worst:.4f}, "
          f"last 5 steps {tail:+.4f}")
    assert worst < 0.05, (fp8, bf16)
    assert abs(tail) < 0.02, (fp8, bf16)
