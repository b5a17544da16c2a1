"""Apply parallelism to a single-device model, from outside, in one fixed order
(pipeline parallelism splits the model into its stage before this; see pipeline.py):

0. FP8 training (training.fp8, float8.py): torchao float8 linears and FP8 grouped GEMMs
1. tensor parallelism with sequence parallelism (tensor.py), then expert parallelism
   (expert.py)
2. activation checkpointing: each transformer block recomputes its activations in backward
   (all of them, or with "selective" all but the outputs of matmuls and attention)
3. torch.compile of each transformer block (training.compile)
4. data parallelism:
   - dp_shard > 1: FSDP2 ``fully_shard`` on each block, then on the root. Parameters,
     gradients and optimizer state are sharded over dp_shard (gathered in fp32 or, with
     parallel.fsdp_param_dtype = "bfloat16", in bf16, the routers excepted, and freed
     after each block's forward unless parallel.fsdp_reshard_after_forward is false);
     with dp_replicate > 1 too, the mesh is 2-D and FSDP2 runs as HSDP (shard inside,
     replicate across). With tp, parameters are 2-D (dp x tp). With ep, each MoE's
     routed experts get their own ``fully_shard`` over the ranks that hold the same
     experts (dp_shard / ep, x dp_replicate); expert.py scales their gradients by 1 / ep,
     so that they are averaged over the whole data-parallel degree like the others.
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
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from trainer.config import ParallelConfig, TrainingConfig
from trainer.model import MoE, Transformer
from trainer.parallel.dims import ParallelDims
from trainer.parallel.expert import apply_ep
from trainer.parallel.float8 import apply_fp8_options
from trainer.parallel.tensor import apply_tp

DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


def _selective_policy():
    """Save the outputs of matmuls (FP8 ones too: torchao's linears, the FP8 routed
    experts) and attention, recompute everything else (norms, activations, RoPE, casts,
    routing) in backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
             "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}

    def policy(_ctx, op, *_args, **_kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _checkpointed(module: nn.Module, policy) -> nn.Module:
    """``module`` wrapped to recompute in backward: everything (``policy`` None), or what
    the selective ``policy`` does not save."""
    if policy is None:
        return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return checkpoint_wrapper(
        module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
        context_fn=lambda: create_selective_checkpoint_contexts(policy))


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """mode "full": every block recomputes all of its activations in backward; "selective":
    every block keeps the outputs of its matmuls and attention and recomputes the rest
    (norms, activations, RoPE, casts, routing), which frees most of the elementwise
    activations for little recomputation."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    policy = _selective_policy() if mode == "selective" else None
    for name, block in list(model.layers.items()):
        model.layers[name] = _checkpointed(block, policy)
    if model.mtp is not None:
        model.mtp.block = _checkpointed(model.mtp.block, policy)


def apply_compile(model: Transformer) -> None:
    """Compile each transformer block in place (names and parameters unchanged), and the
    output head with its loss (on the pipeline stage that holds them)."""
    for block in model.layers.values():
        block.compile()
    if model.mtp is not None:
        model.mtp.block.compile()
    if model.output is not None:
        model.head_loss = torch.compile(model.head_loss)


def apply_fsdp(model: Transformer, dims: ParallelDims, device_type: str,
               options: ParallelConfig | None = None) -> None:
    """FSDP2 on each block (and MTP), then on the root, as ``options`` (the config's
    [parallel]; its defaults when None) say:

    - fsdp_reshard_after_forward: FSDP2's reshard_after_forward for every group;
    - fsdp_param_dtype "bfloat16": every parameter is gathered and computed in bf16 and
      its gradient reduced in fp32, except the routers' (Gate), which keep fp32 as the
      expert choice does everywhere else: each gets a fully_shard of its own with an fp32
      policy;
    - fsdp_prefetch N > 0: each group's all-gather is issued by the group N places
      before it (fsdp_order: the layers, then MTP, with ep > 1 each MoE block's routed
      experts as a group after their block; backward from the last block), not by
      FSDP2's own order."""
    options = options or ParallelConfig()
    mesh = dims.dp_mesh(device_type)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    shard = {"reshard_after_forward": options.fsdp_reshard_after_forward}
    if options.fsdp_bf16:
        full = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for moe in moes:
            fully_shard(moe.gate, mesh=mesh, mp_policy=full, **shard)
        shard["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                  reduce_dtype=torch.float32)
    if dims.ep > 1:
        expert_mesh = dims.expert_dp_mesh(device_type)
        for moe in moes:
            fully_shard(moe.experts, mesh=expert_mesh, **shard)
    blocks = list(model.layers.values()) + ([model.mtp] if model.mtp is not None else [])
    for block in blocks:
        fully_shard(block, mesh=mesh, **shard)
    fully_shard(model, mesh=mesh, **shard)
    if prefetch := options.fsdp_prefetch:
        forward, backward = fsdp_order(blocks, experts_apart=dims.ep > 1)
        for i, group in enumerate(forward):
            group.set_modules_to_forward_prefetch(forward[i + 1:i + 1 + prefetch])
        for i, group in enumerate(backward):
            group.set_modules_to_backward_prefetch(backward[i + 1:i + 1 + prefetch])


def fsdp_order(blocks: list[nn.Module], experts_apart: bool
               ) -> tuple[list[nn.Module], list[nn.Module]]:
    """The FSDP groups in the order forward and backward gather them: the blocks, and with
    ``experts_apart`` (ep > 1, when each MoE's routed experts are a group of their own)
    each MoE block's experts right after their block in both. Forward reaches a block,
    then its experts; backward too, since a block's gather fires when its output's
    gradient arrives, before the experts' inside it."""
    def groups(block: nn.Module) -> list[nn.Module]:
        experts = [m.experts for m in block.modules() if isinstance(m, MoE)]
        return [block, *experts] if experts_apart else [block]

    return ([g for b in blocks for g in groups(b)],
            [g for b in reversed(blocks) for g in groups(b)])


def parallelize(model: Transformer, dims: ParallelDims, device: torch.device,
                training: TrainingConfig, fsdp: ParallelConfig | None = None) -> nn.Module:
    """Return the module to train (the model itself, or its DDP wrapper). With pp > 1,
    ``model`` is this rank's stage (pipeline.split_model). ``training`` (the config's
    [training]) says what to apply: FP8 (float8.apply_fp8_options: the routed experts'
    grouped GEMMs, then the block linears), activation checkpointing, compile; ``fsdp``
    (the config's [parallel]) holds apply_fsdp's options."""
    apply_fp8_options(model, training, device, fsdp=dims.fsdp_enabled)
    if dims.tp > 1:
        apply_tp(model, dims.submesh(device.type, "tp"), routed_experts=dims.ep == 1)
    if dims.ep > 1:
        apply_ep(model, dims.submesh(device.type, "ep"))
    apply_activation_checkpointing(model, training.activation_checkpoint)
    if training.compile:
        apply_compile(model)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims, device.type, fsdp)
        return model
    if dims.ddp_enabled:
        if dims.tp > 1 or dims.pp > 1 or dims.ep > 1:
            raise ValueError("plain DDP does not combine with tp, pp or ep; use dp_shard > 1")
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


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, pp_group=None,
                   fused_optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Clip to a global gradient norm over every parameter of every rank and return the
    norm before clipping. Parameters may be DTensors on different meshes (FSDP, tp, ep):
    the norm is taken per mesh and combined; with ``pp_group`` the stages' squared norms
    are summed too. Nothing here waits for the GPU: the coefficient stays a tensor.

    With ``fused_optimizer`` (whose next step updates these parameters and divides every
    gradient by its ``grad_scale``: trainer.adamw's AdamW, or torch's fused AdamW over
    plain tensors only), gradients are not scaled here: the optimizer divides each by
    1 / the clip coefficient as it reads it, which saves a pass over every gradient in
    memory (read and write). Otherwise one multi-tensor multiply scales them, through the
    local tensors of the sharded ones (a scalar factor is right for any layout, partial
    sums included)."""
    grads = [p.grad for p in params if p.grad is not None]
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    device = grads[0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), device=device, dtype=torch.float32)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float() ** 2
    if pp_group is not None:
        torch.distributed.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if fused_optimizer is not None:  # scaled inside the optimizer's step
        fused_optimizer.grad_scale = coef.reciprocal()
        return total
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if local:
        torch._foreach_mul_(local, coef.to(local[0].device))
    return total
