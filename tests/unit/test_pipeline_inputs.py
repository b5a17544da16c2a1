"""The pipeline stages on CPU with torch's run-time checks of every tensor the stages
exchange (TORCH_DISTRIBUTED_DEBUG=DETAIL): inputs sliced from one token buffer as the
data hands them over, bf16 autocast as on GPUs, both schedules. Each stage compares
each input, output and gradient with the shapes, strides and dtypes of the run that
built it, so what a GPU run would trip over first trips here."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from trainer.model import ModelArgs, Transformer
from trainer.parallel.pipeline import Pipeline, split_model

MICRO_BATCH, SEQ = 4, 16


def _stage(rank: int, world: int, init_file: str, schedule: str, bf16: bool,
           losses: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        dist.set_debug_level(dist.DebugLevel.DETAIL)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
        torch.manual_seed(0)
        model = Transformer(ModelArgs(n_layers=2 * world))
        if world > 1:
            split_model(model, world, rank)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            pipeline = Pipeline(model, rank, mesh, torch.device("cpu"), schedule, 2, 1,
                                (MICRO_BATCH, SEQ))
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            # one buffer of seq + 1 tokens per row, sliced as trainer/data.py does
            batch = torch.randint(0, 256, (MICRO_BATCH, SEQ + 1), generator=generator)
            with autocast:
                loss = pipeline.step(batch[:, :-1], batch[:, 1:])
            if loss is not None:
                losses[rank] = float(loss)
    finally:
        dist.destroy_process_group()


def _run(world: int, schedule: str, bf16: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        losses = mp.Manager().dict()
        mp.spawn(_stage, args=(world, f"{tmp}/init", schedule, bf16, losses), nprocs=world)
        return dict(losses)


@pytest.mark.parametrize(("world", "schedule", "bf16"), [
    (2, "1f1b", True),
    (2, "gpipe", False),
])
def test_pipeline_takes_sliced_inputs_under_run_time_checks(world, schedule, bf16):
    losses = _run(world, schedule, bf16)
    # the last stage reports a finite loss
    assert list(losses) == [world - 1]
    assert torch.isfinite(torch.tensor(losses[world - 1]))
