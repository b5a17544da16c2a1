"""Expert parallelism: the routed experts of every MoE layer sharded over the "ep" mesh.

Each ep rank holds ``n_routed_experts / ep`` consecutive experts (the stacked 3-D expert
weights become ``Shard(0)`` DTensors). The model's MoE code is unchanged: it routes its
own tokens, sorts them by expert and calls ``experts(x, counts)``; the forward installed
here then

1. exchanges the per-expert token counts (all-to-all),
2. dispatches the tokens to the ranks that own their experts (``all_to_all_single``),
3. reorders the received tokens from source-major to expert-major and runs the local
   experts (the model's own GroupedExperts forward on the local weight shards),
4. restores the order and sends the outputs back (``all_to_all_single``).

Both all-to-alls are an autograd Function whose backward is the reverse all-to-all, so
the gradients of the tokens flow back to the ranks they came from, and each expert's
gradient sums the contributions of every token routed to it from the whole ep group.
Data parallelism averages the other gradients over all dp_shard * dp_replicate ranks but
the experts' only over the dp_shard / ep * dp_replicate ranks that hold them, so the
expert weights' gradients are scaled by 1 / ep on their way back (in the autograd graph,
for any backend).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from trainer.model import GroupedExperts, MoE
from trainer.model.permute import PermuteRows, inverse_permutation


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits,
                               group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _expert_major_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """Received tokens come grouped by (source rank, local expert); the permutation that
    groups them by (local expert, source rank) instead."""
    ep, n_local = recv_counts.shape
    counts = recv_counts.flatten().tolist()
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    pieces = [torch.arange(starts[s * n_local + e], starts[s * n_local + e] + counts[
        s * n_local + e]) for e in range(n_local) for s in range(ep)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _install_ep_forward(experts: GroupedExperts, mesh: DeviceMesh) -> None:
    local_run = type(experts).forward
    group = mesh.get_group()
    ep = mesh.size()

    def forward(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n_local = counts.numel() // ep
        send_counts = counts.to(torch.long).view(ep, n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        in_splits = send_counts.sum(dim=1).tolist()
        out_splits = recv_counts.sum(dim=1).tolist()
        received = all_to_all(x, out_splits, in_splits, group)
        order = _expert_major_order(recv_counts.cpu()).to(x.device)
        saved = dict(experts._parameters)
        try:
            for name, p in saved.items():
                if isinstance(p, DTensor):
                    experts._parameters[name] = _ScaleGrad.apply(p.to_local(), 1.0 / ep)
            back = inverse_permutation(order)
            y = local_run(experts, PermuteRows.apply(received, order, back),
                          recv_counts.sum(dim=0))
        finally:
            experts._parameters.update(saved)
        return all_to_all(PermuteRows.apply(y, back, order), in_splits, out_splits, group)

    experts.forward = forward
    experts.fuse_moves = False  # the all-to-alls run between the moves and the experts


def moe_modules(model: nn.Module) -> list[MoE]:
    """Every MoE module of the model, MTP included."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard the routed experts of every MoE layer over the 1-D ep ``mesh``."""
    for moe in moe_modules(model):
        experts = moe.experts
        if experts.w1.size(0) % mesh.size():
            raise ValueError(f"ep ({mesh.size()}) must divide the routed experts "
                             f"({experts.w1.size(0)})")
        for name, p in list(experts.named_parameters(recurse=False)):
            experts.register_parameter(name, nn.Parameter(
                distribute_tensor(p.data, mesh, [Shard(0)]), requires_grad=p.requires_grad))
        _install_ep_forward(experts, mesh)
