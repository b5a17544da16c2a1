"""End-to-end training on CPU: loss falls, data-parallel runs match one process,
resume continues exactly, activation checkpointing changes nothing numerically."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
# DDP/FSDP reduce in a different order than one process does; measured differences are
# below 1e-4, the tolerance leaves room for other CPUs' math libraries.
PARALLEL_TOLERANCE = 2e-3
RESUME_TOLERANCE = 1e-6


def train(cfg: Path, out: Path, nproc: int = 1, steps: int | None = None):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "trainer.train", "--config", str(cfg), "--out", str(out)]
    if steps:
        cmd += ["--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return proc, metrics


def losses(metrics: list[dict]) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics}


def test_tiny_loss_falls_in_one_process(tmp_path):
    proc, metrics = train(ROOT / "trainer" / "configs" / "tiny.toml", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["world_size"] == 1
    assert summary["first_loss"] > 5.0  # about log(256) = 5.55 at the start
    assert summary["last_loss"] < 1.5, summary  # the chain's entropy is 0.64
    assert summary["tokens_per_s"] > 0 and summary["mfu"] is None
    lines = [x for x in proc.stdout.splitlines() if x.startswith("step ")]
    assert len(lines) == 40 and len(metrics) == 40
    assert re.fullmatch(r"step 12/40 \| loss \d+\.\d{4} \| tok/s [\d,]+ \| mfu - \| "
                        r"mem \d+\.\d GiB", lines[11])
    assert metrics[0]["max_expert_load_ratio"] >= 1.0 and metrics[0]["mfu"] is None


def test_profile_step_writes_a_trace(tmp_path):
    cmd = [sys.executable, "-m", "trainer.train", "--config",
           str(ROOT / "trainer" / "configs" / "tiny.toml"), "--out", str(tmp_path / "run"),
           "--steps", "3", "--profile-step", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trace = tmp_path / "run" / "profile" / "step-2-rank-0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # the step's phases, which a GPU profile names its idle gaps by
    assert {f"dsk.{p}" for p in ("forward", "backward", "clip", "optimizer", "reduce")} <= names
    assert re.search(r"^profile of step 2: [\d.]+ ms", proc.stdout, re.M), proc.stdout


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    cfg = tiny_config(tmp, "acc2", training={"grad_accum_steps": 2})  # same global batch as 2 x 1
    return losses(train(cfg, tmp / "run", steps=8)[1])


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_process_run_matches_one_process(tmp_path, single_process_losses, mode):
    parallel = {"dp_shard": -1} if mode == "fsdp" else {"dp_replicate": 2, "dp_shard": 1}
    cfg = tiny_config(tmp_path, mode, parallel=parallel)
    proc, metrics = train(cfg, tmp_path / "run", nproc=2, steps=8)
    two = losses(metrics)
    assert two.keys() == single_process_losses.keys()
    for step, loss in single_process_losses.items():
        assert abs(two[step] - loss) < PARALLEL_TOLERANCE, (step, two[step], loss)
    assert two[8] < two[1] - 1.0
    header = proc.stdout.splitlines()[0]
    assert ("1x2 dp" if mode == "fsdp" else "2x1 dp") in header
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_continues_like_an_uninterrupted_run(tmp_path, nproc):
    cfg = tiny_config(tmp_path, "ckpt", checkpoint={"interval": 2, "keep_last": 3})
    _, full = train(cfg, tmp_path / "full", nproc=nproc, steps=8)
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004", "step-000006",
                                                        "step-000008"]
    assert (ckpts / "step-000008" / "COMPLETE").is_file()

    # a run that stopped after step 4, with a later save that never completed
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(ckpts / "step-000004", resumed_dir / "step-000004")
    shutil.copytree(ckpts / "step-000006", resumed_dir / "step-000006")
    (resumed_dir / "step-000006" / "COMPLETE").unlink()
    # it had logged steps 1-6; steps 5 and 6 are done again and must appear once
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(full_lines[:6]) + "\n")
    proc, logged = train(cfg, tmp_path / "resumed", nproc=nproc, steps=8)
    assert "resumed from" in proc.stdout and "step-000004" in proc.stdout
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6, 7, 8]
    rest = logged[4:]
    expected = losses(full)
    for m in rest:
        assert abs(m["loss"] - expected[m["step"]]) < RESUME_TOLERANCE, (m, expected)
        assert m["lr"] == pytest.approx(next(f["lr"] for f in full if f["step"] == m["step"]))
    assert (resumed_dir / "step-000006" / "COMPLETE").is_file()  # replaced by a full save


def test_bf16_moments_are_saved_as_bf16_and_resume_like_an_uninterrupted_run(tmp_path):
    """training.moments_dtype = "bfloat16" under FSDP2 (two processes): the checkpoint
    holds both moments in bf16, and a run resumed from it follows the run that went on."""
    from torch.distributed.checkpoint import FileSystemReader

    cfg = tiny_config(tmp_path, "m16", training={"moments_dtype": "bfloat16"},
                      checkpoint={"interval": 4, "keep_last": 2})
    _, full = train(cfg, tmp_path / "full", nproc=2, steps=8)
    ckpt = tmp_path / "full" / "checkpoints" / "step-000004"
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    moments = {k: v.properties.dtype for k, v in meta.items()
               if k.startswith("optim.") and k.endswith(("exp_avg", "exp_avg_sq"))}
    from trainer.config import load_config
    from trainer.model import Transformer

    trained = [p for p in Transformer(load_config(cfg).model).parameters() if p.requires_grad]
    assert len(moments) == 2 * len(trained) and set(moments.values()) == {torch.bfloat16}
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "step-000004")
    proc, logged = train(cfg, tmp_path / "resumed", nproc=2, steps=8)
    assert "resumed from" in proc.stdout and "step-000004" in proc.stdout
    expected = losses(full)
    for m in logged:
        assert abs(m["loss"] - expected[m["step"]]) < RESUME_TOLERANCE, (m, expected)


def test_activation_checkpointing_and_mtp_and_shards(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    subprocess.run([sys.executable, "-m", "trainer.prepare", str(tmp_path / "data"), str(text)],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    base = {"data": {"kind": "shards", "path": str(tmp_path / "data")},
            "model": {"mtp_depth": 1}}
    plain = tiny_config(tmp_path, "plain", **base)
    _, a = train(plain, tmp_path / "a", steps=6)
    for mode in ("full", "selective"):
        ac = tiny_config(tmp_path, mode, training={"activation_checkpoint": mode}, **base)
        _, b = train(ac, tmp_path / mode, steps=6)
        for x, y in zip(a, b, strict=True):
            assert abs(x["loss"] - y["loss"]) < 1e-5, mode
            assert abs(x["mtp_loss"] - y["mtp_loss"]) < 1e-5, mode
    assert a[-1]["loss"] < a[0]["loss"] - 1.0  # repetitive text is easy to learn
    assert a[0]["mtp_loss"] > 0
