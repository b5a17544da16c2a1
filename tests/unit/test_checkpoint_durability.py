"""Checkpoints that survive a power cut (trainer/checkpoint.py): every file and directory
is fsynced before COMPLETE, COMPLETE before older checkpoints go; a checkpoint that does
not load makes resuming fall back to the one before; every node prunes its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import checkpoint


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def train_a_step(model, optimizer) -> None:
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def save(root: Path, step: int, model, optimizer, keep_last: int = 2) -> Path:
    return checkpoint.save(root, step, model, optimizer, {"step": step}, keep_last,
                           torch.device("cpu"))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_files_and_directories_are_on_disk_before_complete_and_before_pruning(
        tmp_path, one_rank, monkeypatch):
    root = tmp_path / "checkpoints"
    model, optimizer = model_and_optimizer()
    for step in (1, 2):
        train_a_step(model, optimizer)
        save(root, step, model, optimizer)

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        events.append(("delete", str(path)))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    train_a_step(model, optimizer)
    new = save(root, 3, model, optimizer)

    complete = str(new / checkpoint.MARKER)
    renamed = events.index(("rename", complete))
    before = {path for kind, path in events[:renamed] if kind == "fsync"}
    written = [p for p in new.rglob("*") if p.name != checkpoint.MARKER]
    assert written, "the checkpoint holds no files"
    for path in written + [new, root]:
        assert str(path) in before, f"{path} was not fsynced before COMPLETE"
    # COMPLETE's content before its name, its name (the directory) after the rename
    assert any(kind == "fsync" and path.startswith(complete + ".")
               for kind, path in events[:renamed])
    synced_after = events.index(("fsync", str(new)), renamed)
    # the oldest checkpoint goes only once the new COMPLETE is on disk
    oldest = str(checkpoint.step_dir(root, 1))
    assert events.index(("delete", oldest)) > synced_after
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == [
        "step-000002", "step-000003"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, one_rank):
    root = tmp_path / "checkpoints"
    model, optimizer = model_and_optimizer()
    train_a_step(model, optimizer)
    save(root, 2, model, optimizer)
    at_2 = snapshot(model)
    train_a_step(model, optimizer)
    save(root, 4, model, optimizer)
    # a power cut left the newest checkpoint's shards half-written
    for shard in checkpoint.step_dir(root, 4).glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:7])

    fresh, fresh_optimizer = model_and_optimizer(seed=1)
    said: list[str] = []
    step, state = checkpoint.load_latest(root, fresh, fresh_optimizer, torch.device("cpu"),
                                         say=said.append)
    assert (step, state) == (2, {"step": 2})
    assert len(said) == 1
    assert "step-000004 does not load (rank 0: " in said[0]
    assert said[0].endswith("falling back to step-000002")
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, at_2[name]), name


def test_no_loadable_checkpoint_is_an_error_and_none_at_all_is_a_fresh_start(tmp_path,
                                                                           one_rank):
    root = tmp_path / "checkpoints"
    model, optimizer = model_and_optimizer()
    assert checkpoint.load_latest(root, model, optimizer, torch.device("cpu")) is None
    save(root, 1, model, optimizer)
    (checkpoint.step_dir(root, 1) / "train_state.json").write_text("{not json")
    said: list[str] = []
    with pytest.raises(RuntimeError, match="no complete checkpoint under .* loads"):
        checkpoint.load_latest(root, model, optimizer, torch.device("cpu"), say=said.append)
    assert said and "no older complete checkpoint is left" in said[0]


def _node(rank: int, world: int, init_file: str, roots: list[str]) -> None:
    os.environ["LOCAL_RANK"] = "0"  # one rank per node: each acts for its node
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, optimizer = model_and_optimizer()
        for step in (1, 2, 3):
            train_a_step(model, optimizer)
            save(Path(roots[rank]), step, model, optimizer, keep_last=2)
    finally:
        dist.destroy_process_group()


def test_every_node_prunes_the_checkpoints_on_its_own_disk(tmp_path):
    roots = [str(tmp_path / f"node{i}" / "checkpoints") for i in (0, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_node, args=(2, f"{tmp}/init", roots), nprocs=2)
    for root in roots:
        held = sorted(p.name for p in Path(root).iterdir())
        assert held == ["step-000002", "step-000003"], (root, held)
        assert [p.name for p in checkpoint.complete_checkpoints(Path(root))] == held
