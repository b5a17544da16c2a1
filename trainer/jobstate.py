"""What the trainer does for a job (trainer/job.py): per-rank log files, a clean stop on
SIGTERM, and a small status file that ``dsk-provision jobs status`` reads.

All of it is keyed by ``DSK_JOB_DIR`` (the job's directory on the node, set by the
launcher); without it the trainer behaves as a plain command.

- Each rank appends its stdout and stderr to ``$DSK_JOB_DIR/logs/rank-<R>.log``, after a
  first line that says the rank starts (and in which container runtime, if any).
- SIGTERM asks for a stop: at the next step boundary every rank agrees (one all-reduce of
  a flag per step), a checkpoint is saved when checkpointing is on, and the ranks exit 0,
  so torchrun does not restart them.
- A job whose stop was requested (``stop-requested`` in the job dir) does not start again
  (torchrun restarting a rank that was killed during the stop).
- Rank 0 writes ``<out>/status.json`` after every step: step, loss, tokens/s, MFU, ETA,
  the last checkpoint, the restarts (trainer/resilience.py), and the state (running, finished,
  stopped).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

JOB_DIR_VAR = "DSK_JOB_DIR"
STOP_FILE = "stop-requested"  # the same name as trainer.job.STOP_FILE


def job_dir() -> Path | None:
    value = os.environ.get(JOB_DIR_VAR)
    return Path(value) if value else None


def redirect_to_rank_log() -> Path | None:
    """Send this process's stdout and stderr to the job's log of its rank (appending)."""
    base = job_dir()
    if base is None:
        return None
    rank = os.environ.get("RANK", "0")
    path = base / "logs" / f"rank-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    engine = container_engine()
    print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank} starts "
          f"(attempt {int(attempt) + 1})" + (f" in a {engine} container" if engine else ""),
          flush=True)
    return path


def container_engine(root: Path = Path("/")) -> str | None:
    """The container runtime this process runs under (``train --container``), by the
    file each one leaves in its containers; None on the host."""
    if (root / "run" / ".containerenv").exists():
        return "podman"
    if (root / ".dockerenv").exists():
        return "docker"
    return None


def stop_already_requested() -> bool:
    base = job_dir()
    return base is not None and (base / STOP_FILE).exists()


def restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class StopSignal:
    """SIGTERM sets a flag; ``reduced`` tells every rank, at the same step, whether any rank
    has it (a collective: call it on every rank at every step)."""

    def __init__(self) -> None:
        import threading

        self.flag = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, _signum, _frame) -> None:
        self.flag = True

    def reduced(self, device):
        """The flag, reduced over every rank (any rank's stop stops all), as a one-element
        tensor on ``device``: queued, not read (trainer.readout reads it one step late).
        Made by a fill, not a copy from the host: a copy would wait for the device."""
        import torch
        import torch.distributed as dist

        box = torch.full((1,), 1.0 if self.flag else 0.0, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return box

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StatusFile:
    """<out>/status.json, written whole by rank 0."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int):
        self.path = out_dir / "status.json"
        self.total = total_steps
        self.start_step = start_step
        self.times: list[float] = []
        self.data: dict[str, Any] = {
            "state": "running", "step": start_step, "steps": total_steps,
            "start_step": start_step, "loss": None, "tokens_per_s": None, "mfu": None,
            "eta_s": None, "last_checkpoint": None, "restarts": restarts(),
            "pid": os.getpid(), "started": time.time()}
        self._write()

    def step(self, metrics: dict[str, Any]) -> None:
        self.times = (self.times + [metrics["step_time_s"]])[-20:]
        timed = self.times[1:] or self.times  # the first step includes warm-up
        per_step = sum(timed) / len(timed)
        self.data.update(step=metrics["step"], loss=metrics["loss"],
                         tokens_per_s=metrics["tokens_per_s"], mfu=metrics["mfu"],
                         eta_s=per_step * (self.total - metrics["step"]))
        self._write()

    def restarts(self, total: int, since_checkpoint: int) -> None:
        """Restarts of this launch, and since the newest checkpoint (trainer.resilience)."""
        self.data.update(restarts=total, restarts_since_checkpoint=since_checkpoint)
        self._write()

    def checkpoint(self, step: int) -> None:
        self.data["last_checkpoint"] = step
        self._write()

    def end(self, state: str) -> None:
        self.data.update(state=state, eta_s=0 if state == "finished" else None,
                         ended=time.time())
        self._write()

    def _write(self) -> None:
        self.data["updated"] = time.time()
        tmp = self.path.with_name(".status.json.tmp")
        tmp.write_text(json.dumps(self.data) + "\n")
        os.replace(tmp, self.path)


def checkpoints_shared(ckpt_root: Path) -> bool:
    """Whether every rank sees the same checkpoint directory (collective): rank 0 writes
    a probe file into it and every rank looks for it. Always true on one node."""
    import uuid

    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if local >= dist.get_world_size():
        return True
    box = [f".shared-probe-{uuid.uuid4().hex}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    probe = ckpt_root / box[0]
    if dist.get_rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        probe.write_text("probe\n")
    dist.barrier()
    seen = [probe.is_file()]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen[0])
    dist.barrier()
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    return all(everyone)
