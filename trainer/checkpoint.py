"""Checkpoints with torch.distributed.checkpoint (DCP): save every N steps, keep the last
K, resume from the newest complete one.

Layout: <out>/checkpoints/step-000020/ holds the DCP files (model and optimizer, each
rank writing its own shards), train_state.json (step, scheduler, data position, written
by rank 0), rng-rank<R>.pt (each rank's RNG state) and, last, COMPLETE: rank 0 writes it
after a barrier that every rank reaches only once its part of the save has finished.
A directory without COMPLETE is ignored on resume and replaced on the next save.
``load_model`` reads the model alone from such a directory or from an imported one
(trainer/convert.py), for ``train --init-from``.
Resuming on several nodes needs the checkpoint folder on a file system they share.
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


def _write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save(_rng_state(device), path / f"rng-rank{rank}.pt")
    if rank == 0:
        _write_whole(path / "train_state.json", json.dumps(train_state, indent=1) + "\n")
    dist.barrier()
    if rank == 0:
        _write_whole(path / MARKER, f"step {step}\n")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def latest_step(root: Path) -> int | None:
    """The newest complete checkpoint's step as rank 0 sees it, agreed by every rank."""
    found = complete_checkpoints(root) if dist.get_rank() == 0 else []
    box = [int(found[-1].name[len(PREFIX):]) if found else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
