"""A step's figures read back one step late (trainer.readout) and the training loop around
it: every step's figures arrive in order, the stop flag is acted on at the step after the
one it was seen in, with a final checkpoint of that step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from trainer.readout import Readout
from trainer.step import StepResult

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def result(loss: float, grad_norm: float | None = None, balance: float | None = None):
    return StepResult(torch.tensor([loss, loss / 2]), 1e-3,
                      None if grad_norm is None else torch.tensor(grad_norm),
                      None if balance is None else torch.tensor(balance))


def test_figures_come_back_with_what_the_step_had_and_nothing_else():
    readout = Readout(CPU)
    readout.begin()
    full = readout.end(7, result(2.5, 0.75, 1.5), torch.tensor([1.0])).read()
    assert (full.step, full.loss, full.mtp_loss, full.lr) == (7, 2.5, 1.25, 1e-3)
    assert (full.grad_norm, full.max_expert_load_ratio, full.stop) == (0.75, 1.5, True)
    readout.begin()
    bare = readout.end(8, result(2.0), torch.tensor([0.0])).read()
    assert bare.grad_norm is None and bare.max_expert_load_ratio is None and not bare.stop


def test_a_step_times_from_the_end_of_the_one_before_unless_paused():
    readout = Readout(CPU)
    readout.begin()
    first = readout.end(1, result(1.0), torch.tensor([0.0]))
    time.sleep(0.05)  # host work between steps, while the steps follow each other
    readout.begin()
    second = readout.end(2, result(1.0), torch.tensor([0.0]))
    assert second.read().seconds >= 0.05 and first.read().seconds < 0.05
    readout.pause()
    time.sleep(0.05)  # e.g. a checkpoint: not the next step's time
    readout.begin()
    third = readout.end(3, result(1.0), torch.tensor([0.0]))
    assert third.read().seconds < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_figures_are_read_behind_an_event():
    readout = Readout(torch.device("cuda"))
    readout.begin()
    out = StepResult(torch.tensor([3.0, 0.0], device="cuda"), 1e-3, None, None)
    pending = readout.end(1, out, torch.zeros(1, device="cuda"))
    assert pending.values.is_pinned()
    figures = pending.read()
    assert figures.loss == 3.0 and figures.seconds >= 0


def test_sigterm_stops_after_the_next_step_with_its_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "stop", checkpoint={"interval": 1000, "keep_last": 2})
    out = tmp_path / "run"
    cmd = [sys.executable, "-u", "-m", "trainer.train", "--config", str(cfg), "--out",
           str(out), "--steps", "2000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 5/"):
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stopped = [x for x in lines if x.startswith("stopped at step ")]
    assert stopped, "".join(lines)
    step = int(stopped[0].split()[3].rstrip(":"))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 5 < step < 2000
    assert [m["step"] for m in metrics] == list(range(1, step + 1))  # every step, in order
    assert (out / "checkpoints" / f"step-{step:06d}" / "COMPLETE").exists(), \
        sorted(p.name for p in (out / "checkpoints").iterdir())
