"""Tensor parallelism with sequence parallelism, applied to the unchanged model.

Layout over the "tp" mesh dimension (DTensor ``parallelize_module``):

- The residual stream between modules is this rank's sequence shard as a plain tensor
  (``Shard(1)`` of the full activations, so that pipeline stages can send it); RMSNorms
  run on their shard (``SequenceParallel``).
- ``embed``: rows (vocabulary) sharded, output reduce-scattered to ``Shard(1)``.
- MLA: the input is all-gathered along the sequence, then the head-parallel projections
  run on ``n_heads / tp`` local heads: ``wq`` (or ``wq_b``) and ``wkv_b`` colwise, ``wo``
  rowwise with its output reduce-scattered back to ``Shard(1)``. The low-rank
  down-projections (``wq_a``, ``wkv_a``) and their norms are replicated and compute on
  local tensors. The decoupled RoPE key ``k_pe`` is shared by all heads but each rank
  only uses it for its own heads, so its gradient is all-reduced over tp (the kv latent's
  gradient already is, by ``wkv_b``'s colwise input).
- Dense MLP: ``w1``/``w3`` colwise, ``w2`` rowwise (output ``Shard(1)``).
- MoE: the input is all-gathered along the sequence; the router and the routed experts
  are replicated (every tp rank routes the same tokens the same way, so their gradients
  agree), or with ep the routed experts are left to expert parallelism, whose groups
  then exchange the same tokens on every tp rank; the shared experts are
  colwise/rowwise; the sum leaves as ``Shard(1)``.
- ``norm`` sequence parallel; ``output`` colwise on the vocabulary with the logits
  gathered (``Replicate``), so the loss is the plain cross-entropy on every tp rank.
- MTP: its norms and ``eh_proj`` run per token on the sequence shards
  (``SequenceParallel``), its block like the others; it uses the same head.

Replicated parameters are ``Replicate`` DTensors (so FSDP, gradient clipping and DCP
treat every parameter alike); their modules run on local tensors (see ``local_forward``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from trainer.model import MLA, Block, MoE, Transformer


def local_forward(module: nn.Module) -> None:
    """Run ``module``'s own forward with its DTensor parameters seen as local tensors.

    The parameters stay registered (FQNs, FSDP and checkpoints are unchanged); for the
    duration of one call the module's parameter slots hold ``p.to_local()``, which is
    differentiable, so gradients reach the DTensor parameters."""
    forward = type(module).forward

    def run_local(*args, **kwargs):
        saved = dict(module._parameters)
        try:
            for name, p in saved.items():
                if isinstance(p, DTensor):
                    module._parameters[name] = p.to_local()
            return forward(module, *args, **kwargs)
        finally:
            module._parameters.update(saved)

    module.forward = run_local


class ReplicateLocal(ParallelStyle):
    """Parameters replicated over the mesh (``Replicate`` DTensors), computed on local
    tensors: for modules whose inputs and output gradients agree on every tp rank."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        replicate_params(module, device_mesh)
        local_forward(module)
        return module


def replicate_params(module: nn.Module, mesh: DeviceMesh) -> None:
    for name, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(p.data, mesh, [Replicate()]), requires_grad=p.requires_grad))


class _AllReduceGradFrom(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of the last-dim columns from
    ``start`` on over ``group`` (the rest of the gradient is left as is)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, start: int, group) -> torch.Tensor:
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        tail = grad[..., ctx.start:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., ctx.start:] = tail
        return grad, None, None


def _reduce_rope_key_grad(attn: MLA, group) -> None:
    start = attn.kv_lora_rank

    def hook(_module, _inputs, output):
        return _AllReduceGradFrom.apply(output, start, group)

    attn.wkv_a.register_forward_hook(hook)


def _parallelize_attention(attn: MLA, mesh: DeviceMesh) -> None:
    tp = mesh.size()
    plan: dict[str, ParallelStyle] = {
        "wkv_a": ReplicateLocal(),
        "kv_norm": ReplicateLocal(),
        "wkv_b": ColwiseParallel(),
        "wo": RowwiseParallel(output_layouts=Shard(1)),
    }
    if attn.q_lora_rank == 0:
        plan["wq"] = ColwiseParallel()
    else:
        plan.update({"wq_a": ReplicateLocal(), "q_norm": ReplicateLocal(),
                     "wq_b": ColwiseParallel()})
    parallelize_module(attn, mesh, plan)
    parallelize_module(attn, mesh, PrepareModuleInput(
        input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
        use_local_output=True))
    _reduce_rope_key_grad(attn, mesh.get_group())
    attn.n_heads = attn.n_heads // tp  # heads on this rank: the views in forward use it


def _parallelize_moe(moe: MoE, mesh: DeviceMesh, routed_experts: bool) -> None:
    plan: dict[str, ParallelStyle] = {"gate": ReplicateLocal()}
    if routed_experts:
        plan["experts"] = ReplicateLocal()
    if moe.shared_experts is not None:
        plan.update({
            "shared_experts.w1": ColwiseParallel(),
            "shared_experts.w3": ColwiseParallel(),
            "shared_experts.w2": RowwiseParallel(output_layouts=Replicate()),
        })
    parallelize_module(moe, mesh, plan)
    parallelize_module(moe, mesh, PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
        use_local_output=True))
    parallelize_module(moe, mesh, PrepareModuleOutput(
        output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
        use_local_output=True))


def apply_tp(model: Transformer, mesh: DeviceMesh, routed_experts: bool = True) -> None:
    """Shard ``model`` in place over the 1-D tp ``mesh`` (see the module docstring).
    ``routed_experts=False`` leaves the routed experts to expert parallelism, which then
    runs the same way on every tp rank (their tokens agree)."""
    parallelize_module(model, mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(use_local_output=True),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(),
                                  use_local_output=True),
    })
    for block in model.layers.values():
        _parallelize_block(block, mesh, routed_experts)
    if model.mtp is not None:
        # per-token modules on the sequence shards; the head is the model's own output
        parallelize_module(model.mtp, mesh, {
            name: SequenceParallel(use_local_output=True)
            for name in ("hnorm", "enorm", "eh_proj", "norm")})
        _parallelize_block(model.mtp.block, mesh, routed_experts)


def _parallelize_block(block: Block, mesh: DeviceMesh, routed_experts: bool) -> None:
    parallelize_module(block, mesh, {"attn_norm": SequenceParallel(use_local_output=True),
                                     "ffn_norm": SequenceParallel(use_local_output=True)})
    _parallelize_attention(block.attn, mesh)
    if isinstance(block.ffn, MoE):
        _parallelize_moe(block.ffn, mesh, routed_experts)
    else:
        parallelize_module(block.ffn, mesh, {
            "w1": ColwiseParallel(), "w3": ColwiseParallel(),
            "w2": RowwiseParallel(output_layouts=Shard(1)),
        })
        parallelize_module(block.ffn, mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)))
