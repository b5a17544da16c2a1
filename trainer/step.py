"""One training step: forward and backward of each of the step's micro-batches, then the
update and what the step measured.

Two paths differ only in how the micro-batches run, and share everything after:

- PlainStep runs each micro-batch through the whole model (or its FSDP/DDP wrapper) and
  back-propagates the micro-batch's share of the loss; data-parallel gradients are
  synchronised on the step's last micro-batch only.
- PipelineStep hands each micro-batch to the pipeline schedule, which runs this rank's
  stage on the pipeline micro-batches (and FSDP's gradient sync itself); the loss exists
  only on the last stage, and the experts' loads are counted by forward hooks because the
  schedule runs a stage's forward several times per micro-batch.

Then: clip the global gradient norm, step the optimizer and the lr schedule, average the
losses over the ranks that hold one, and sum every MoE layer's expert loads over all
ranks to update the routing bias (aux-loss-free balancing) identically everywhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config import TrainConfig, uses_bf16
from trainer.model import MoE, Transformer
from trainer.optim import build_optimizer
from trainer.parallel import ParallelDims, clip_grad_norm, parallelize
from trainer.parallel.pipeline import Pipeline, split_model
from trainer.profiling import PHASE


def phase(name: str):
    """A torch.profiler range naming a part of the step (``dsk.<name>``): what a profile
    (``--profile-step``) attributes the GPU's idle gaps to (trainer/profiling.py)."""
    return torch.profiler.record_function(PHASE + name)


@dataclass
class StepResult:
    """A queued step's figures, still on the device (trainer.readout reads them)."""

    losses: torch.Tensor  # (lm, mtp): mean losses over the step's tokens, all ranks
    lr: float  # the lr this step's update used
    grad_norm: torch.Tensor | None  # before clipping; None when clipping is off
    balance: torch.Tensor | None  # busiest expert / mean, worst MoE layer; None: dense


def set_balance_grad_scale(model: torch.nn.Module, scale: float) -> None:
    """Give the sequence-wise balance loss of every MoE layer (MTP's included) the weight
    that the language-model loss of one forward gets in the step's backward."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.balance_grad_scale = scale


class Step:
    """What both paths share; a subclass runs the micro-batches (``accumulate``)."""

    def __init__(self, model: Transformer, dims: ParallelDims, device: torch.device,
                 cfg: TrainConfig, moe_layers: dict[int, MoE], n_moe: int):
        self.model = model  # this rank's stage of the model, parallelized in place
        self.dims = dims
        self.device = device
        self.grad_clip = cfg.training.grad_clip
        self.n_experts = cfg.model.n_routed_experts
        self.moe_layers = moe_layers  # {index among all the model's MoE layers: layer here}
        self.n_moe = n_moe
        bf16 = uses_bf16(cfg.training.dtype, device.type)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.pp_group = None  # the group whose stages' gradient norms add up
        self.optimizer, self.scheduler = build_optimizer(model, cfg)

    def accumulate(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch. Returns the summed micro-batch mean
        losses (lm, mtp) of this rank and its expert loads (n_moe x n_experts)."""
        raise NotImplementedError

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        losses, loads = self.accumulate(micro_batches)
        losses /= len(micro_batches)
        # trainer.adamw's AdamW applies the clip coefficient as it reads the gradients,
        # instead of a pass of its own over them (clip_grad_norm)
        with phase("clip"):
            grad_norm = (clip_grad_norm(list(self.model.parameters()), self.grad_clip,
                                        self.pp_group, fused_optimizer=self.optimizer)
                         if self.grad_clip > 0 else None)
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
        with phase("reduce"):
            world_size = dist.get_world_size()
            if world_size > 1:  # with pp, only the last stage's ranks hold a loss
                dist.all_reduce(losses)
                losses /= world_size // self.dims.pp
            balance = self.balance_experts(loads)
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        return StepResult(losses, lr, grad_norm, balance)

    def balance_experts(self, loads: torch.Tensor) -> torch.Tensor | None:
        """Sum the loads over all ranks, update each MoE layer's routing bias from them,
        and return the worst layer's busiest-expert-to-mean ratio (None: no MoE)."""
        if not self.n_moe:
            return None
        if dist.get_world_size() > 1:
            dist.all_reduce(loads)
        for j, moe in self.moe_layers.items():
            moe.update_bias(loads[j])
        return (loads.max(dim=1).values.float() / loads.float().mean(dim=1)).max()

    def _zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        loads = torch.zeros(self.n_moe, self.n_experts, dtype=torch.long, device=self.device)
        losses = torch.zeros(2, device=self.device)  # lm loss, mtp loss (micro-batch means)
        return losses, loads


class PlainStep(Step):
    """Each micro-batch through the whole model; ``train_module`` is the model or its
    DDP wrapper."""

    def __init__(self, model: Transformer, train_module: torch.nn.Module, dims: ParallelDims,
                 device: torch.device, cfg: TrainConfig, moe_layers: dict[int, MoE],
                 n_moe: int):
        super().__init__(model, dims, device, cfg, moe_layers, n_moe)
        self.train_module = train_module
        # each micro-batch's loss is back-propagated with weight 1 / micro-batches
        set_balance_grad_scale(model, 1.0 / cfg.training.grad_accum_steps)

    def accumulate(self, micro_batches):
        losses, loads = self._zeros()
        for i, (inputs, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if self.dims.ddp_enabled and not last:
                sync = self.train_module.no_sync()
            elif self.dims.fsdp_enabled:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with phase("forward"), self.autocast:
                    out = self.train_module(inputs, targets)
                with phase("backward"):
                    (out.loss / len(micro_batches)).backward()
            losses += torch.stack([out.lm_loss.detach(), out.mtp_loss.detach()]).float()
            for j, moe in self.moe_layers.items():
                loads[j] += moe.tokens_per_expert
        return losses, loads


class PipelineStep(Step):
    """Each micro-batch through the pipeline schedule, which runs this rank's stage."""

    def __init__(self, model: Transformer, train_module: torch.nn.Module, pp_rank: int,
                 dims: ParallelDims, device: torch.device, cfg: TrainConfig,
                 moe_layers: dict[int, MoE], n_moe: int):
        super().__init__(model, dims, device, cfg, moe_layers, n_moe)
        t, p = cfg.training, cfg.parallel
        pp_mesh = dims.submesh(device.type, "pp")
        self.pp_group = pp_mesh.get_group()
        with self.autocast:
            self.pipeline = Pipeline(train_module, pp_rank, pp_mesh, device, p.pp_schedule,
                                     p.n_microbatches, t.grad_accum_steps,
                                     (t.micro_batch_size, t.seq_len))
        set_balance_grad_scale(model, self.pipeline.loss_scale)
        # every pipeline micro-batch's routing, counted from here on (not the pipeline's
        # shape-inference run above)
        self.stage_loads = {i: torch.zeros(self.n_experts, dtype=torch.long, device=device)
                            for i in moe_layers}
        for i, moe in moe_layers.items():
            moe.load_index = i
            moe.register_forward_hook(self._count_load)

    def _count_load(self, moe: MoE, _inputs, _output) -> None:
        self.stage_loads[moe.load_index].add_(moe.tokens_per_expert)

    def accumulate(self, micro_batches):
        losses, loads = self._zeros()
        for inputs, targets in micro_batches:
            with phase("pipeline"), self.autocast:  # forward and backward, interleaved
                loss = self.pipeline.step(inputs, targets)
            if loss is not None:  # the last stage
                losses[0] += loss.float()
        for j, acc in self.stage_loads.items():
            loads[j] += acc
            acc.zero_()
        return losses, loads


def build_step(model: Transformer, cfg: TrainConfig, dims: ParallelDims,
               device: torch.device) -> Step:
    """Turn the whole ``model`` into this rank's part (its pipeline stage, with tensor,
    expert and data parallelism applied) and return the step that trains it."""
    # MoE layers by their index among all of the model's MoE layers: a pipeline stage
    # holds some of them, and the loads of all are summed over every rank at once
    moe_index = {name: i for i, name in enumerate(
        n for n, b in model.layers.items() if b.ffn in model.moe_layers())}
    pp_rank = dims.pp_rank(device.type)
    if dims.pp > 1:
        split_model(model, dims.pp, pp_rank, seq_shards=dims.tp)
    moe_layers = {moe_index[n]: b.ffn for n, b in model.layers.items() if n in moe_index}
    t = cfg.training
    model.loss_chunk_tokens = t.loss_chunk_tokens
    train_module = parallelize(model, dims, device, t, cfg.parallel)
    if dims.pp > 1:
        return PipelineStep(model, train_module, pp_rank, dims, device, cfg, moe_layers,
                            len(moe_index))
    return PlainStep(model, train_module, dims, device, cfg, moe_layers, len(moe_index))
