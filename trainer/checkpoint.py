"""Checkpoints with torch.distributed.checkpoint (DCP): save every N steps, keep the last
K, resume from the newest complete one.

Layout: <out>/checkpoints/step-000020/ holds the DCP files (model and optimizer, each
rank writing its own shards), train_state.json (step, scheduler, data position: the same
on every rank, written by rank 0 and each node's local rank 0), rng-rank<R>.pt (each
rank's RNG state) and, last, COMPLETE.
A directory without COMPLETE is ignored on resume and replaced on the next save.
``load_model`` reads the model alone from such a directory or from an imported one
(trainer/convert.py), for ``train --init-from``.

A save survives a power cut at any moment: once every rank has written its part (a
barrier), one process per node (local rank 0) fsyncs every file of the new directory,
the directory and its parent, so that what the node's ranks wrote is on disk; after a
second barrier the same process writes COMPLETE (a temporary file, fsynced, renamed,
the directory fsynced again). Only after a third barrier, when COMPLETE is durable on
every node, does each node delete its checkpoints beyond the last K: on a file system
that each node has to itself, every node prunes its own; on a shared one they delete the
same directories (whoever comes second finds nothing to delete).

Resuming tries the newest complete checkpoint; if it does not load on some rank (a
damaged or missing file), every rank falls back to the previous complete one, and rank 0
says so. Resuming on several nodes needs the checkpoint folder on a file system they
share (or the same files on each node's disk).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from trainer.resilience import drill_save_pause

MARKER = "COMPLETE"
PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def fsync_path(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_whole(path: Path, text: str, durable: bool = False) -> None:
    """Write ``path`` whole (a temporary file renamed over it); ``durable``: on disk,
    content and name, before this returns."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def sync_tree(path: Path) -> None:
    """fsync every file under ``path``, every directory under it, ``path`` and its parent
    (which holds its name)."""
    for sub, dirs, files in os.walk(path):
        for name in files:
            fsync_path(Path(sub) / name)
        for name in dirs:
            fsync_path(Path(sub) / name)
    fsync_path(path)
    fsync_path(path.parent)


def node_leader() -> bool:
    """Whether this rank acts for its node: local rank 0 (the only rank without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints under ``root`` older than the last ``keep_last``
    (their COMPLETE marker first, so that a deletion cut short leaves a directory that
    resuming ignores); returns those deleted. Incomplete directories are left to the
    next save of their step."""
    gone = []
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        try:
            (old / MARKER).unlink()
            fsync_path(old)
        except FileNotFoundError:
            continue  # another node pruned it (a shared file system)
        shutil.rmtree(old, ignore_errors=True)
        gone.append(old)
    return gone


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         train_state: dict[str, Any], keep_last: int, device: torch.device) -> Path:
    """Save on every rank (collective). Returns the checkpoint directory."""
    rank = dist.get_rank()
    path = step_dir(root, step)
    if rank == 0:
        if path.exists():  # a save of this step that never completed
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    path.mkdir(parents=True, exist_ok=True)  # a node with a disk of its own
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save(_rng_state(device), path / f"rng-rank{rank}.pt")
    drill_save_pause(step)  # tests only: a rank killed in the middle of a save
    leader = node_leader()
    if rank == 0 or leader:  # the same on every rank; each node's copy gets one
        _write_whole(path / "train_state.json", json.dumps(train_state, indent=1) + "\n")
    dist.barrier()  # every rank's files are written
    if leader:
        sync_tree(path)
    dist.barrier()  # and on disk, on every node
    if leader:
        _write_whole(path / MARKER, f"step {step}\n", durable=True)
    dist.barrier()  # complete everywhere: the older checkpoints may go
    if leader:
        prune(root, keep_last)
    return path


def latest_step(root: Path) -> int | None:
    """The newest complete checkpoint's step as rank 0 sees it, agreed by every rank."""
    steps = complete_steps(root)
    return steps[-1] if steps else None


def complete_steps(root: Path) -> list[int]:
    """The complete checkpoints' steps as rank 0 sees them, oldest first, agreed by every
    rank."""
    found = complete_checkpoints(root) if dist.get_rank() == 0 else []
    box = [[int(p.name[len(PREFIX):]) for p in found]]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _why(exc: BaseException) -> str:
    """One line on why a load failed: DCP's exception carries each rank's traceback,
    whose last line is the cause."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    if type(exc).__name__ == "CheckpointException" and lines:
        return lines[-1][:300]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def load_latest(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device, say=print) -> tuple[int, dict[str, Any]] | None:
    """Load the newest complete checkpoint that loads on every rank (collective): its
    step and train_state, or None when there is no complete checkpoint. A checkpoint
    that fails on some rank is skipped for the one before it, and ``say`` (on rank 0)
    tells which and why. Raises RuntimeError when none loads."""
    steps = complete_steps(root)
    failures = []
    for step in reversed(steps):
        error = None
        try:
            state = load(root, step, model, optimizer, device)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = _why(exc)
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not bad:
            return step, state
        where = f"rank {bad[0][0]}: {bad[0][1]}"
        failures.append(f"{step_dir(root, step).name} ({where})")
        if dist.get_rank() == 0:
            older = [s for s in steps if s < step]
            then = (f"falling back to {step_dir(root, older[-1]).name}" if older
                    else "no older complete checkpoint is left")
            say(f"checkpoint {step_dir(root, step)} does not load ({where}); {then}")
    if steps:
        raise RuntimeError(f"no complete checkpoint under {root} loads: "
                           + "; ".join(failures))
    return None


def load(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         device: torch.device) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place (collective); returns train_state."""
    path = step_dir(root, step)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rng_file = path / f"rng-rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    return json.loads((path / "train_state.json").read_text())


def load_model(path: Path, model: torch.nn.Module) -> None:
    """Load only the model weights of the checkpoint at ``path`` into ``model`` (this
    rank's part of it, in any parallel layout; collective). ``path`` is a checkpoint
    written by ``python -m trainer.convert import`` or a run's step directory: both hold
    the model under the "model" key. The optimizer, schedule and data position are not
    touched."""
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no .metadata)")
    model_sd = get_model_state_dict(model)
    state = {"model": model_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
