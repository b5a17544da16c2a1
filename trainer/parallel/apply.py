"""Apply parallelism to a single-device model, from outside, in one fixed order:

1. tensor / expert parallelism (not in this version: config validation rejects tp, ep > 1)
2. activation checkpointing: each transformer block recomputes its activations in backward
3. torch.compile (not in this version)
4. data parallelism:
   - dp_shard > 1: FSDP2 ``fully_shard`` on each block, then on the root. Parameters,
     gradients and optimizer state are sharded over dp_shard; with dp_replicate > 1 too,
     the mesh is 2-D and FSDP2 runs as HSDP (shard inside, replicate across).
   - dp_replicate > 1 and dp_shard == 1: DistributedDataParallel (full replicas,
     gradients all-reduced in buckets during backward).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from trainer.model import Transformer
from trainer.parallel.dims import ParallelDims

DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """mode "full": wrap every block so its activations are recomputed in backward."""
    if mode == "none":
        return
    if mode != "full":
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if model.mtp is not None:
        model.mtp.block = checkpoint_wrapper(model.mtp.block,
                                             checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fsdp(model: Transformer, dims: ParallelDims, device_type: str) -> None:
    mesh = dims.dp_mesh(device_type)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    if model.mtp is not None:
        fully_shard(model.mtp, mesh=mesh)
    fully_shard(model, mesh=mesh)


def parallelize(model: Transformer, dims: ParallelDims, device: torch.device,
                activation_checkpoint: str = "none") -> nn.Module:
    """Return the module to train (the model itself, or its DDP wrapper)."""
    if dims.tp > 1 or dims.ep > 1 or dims.pp > 1:
        raise ValueError("tensor, expert and pipeline parallelism are not in this version")
    apply_activation_checkpointing(model, activation_checkpoint)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims, device.type)
        return model
    if dims.ddp_enabled:
        group = dims.dp_mesh(device.type).get_group()
        # the selection bias starts equal and is updated identically on every rank from
        # all-reduced loads, so buffers need no broadcast in each forward
        no_buffer_sync = {"broadcast_buffers": False}
        if "forward_sync_buffers" in DDP_PARAMETERS:  # the newer name
            no_buffer_sync = {"forward_sync_buffers": False}
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group, **no_buffer_sync)
    return model
