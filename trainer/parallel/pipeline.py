"""Pipeline parallelism with torch.distributed.pipelining.

The model is split by layer before any other parallelism is applied: stage ``s`` of
``pp`` keeps a contiguous run of the ModuleDict's layers (the first ``n_layers % pp``
stages get one more) and drops the others; the first stage keeps the embedding, the last
keeps the final norm and the output head. Parameter names do not change, so checkpoints
of a stage hold the full model's names and load into any other layout.

A stage's forward: tokens -> hidden states on the first stage, hidden states -> hidden
states in between, -> logits on the last. The schedule (GPipe or 1F1B) splits each
training micro-batch into ``n_microbatches`` along the batch dimension; the loss is
computed on the last stage. The schedule's own gradient scaling is off (it would also
rescale gradients accumulated by earlier training micro-batches); instead each pipeline
micro-batch's loss is scaled by 1 / (n_microbatches * grad_accum_steps), so the
gradients are the mean over the whole step, as in one process.

The stages learn their input and output shapes from a first run of the schedule; the
Pipeline does that run on zeros when it is built (and drops its gradients), so that
training steps run only real data through the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from trainer.model import Transformer, lm_cross_entropy

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layers: int, pp: int, stage: int) -> list[int]:
    """The layer indices of ``stage``: contiguous, the first n_layers % pp stages one more."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return list(range(start, start + base + (1 if stage < extra else 0)))


def split_model(model: Transformer, pp: int, stage: int, seq_shards: int = 1) -> Transformer:
    """Turn ``model`` in place into pipeline stage ``stage`` of ``pp`` and return it.

    ``seq_shards``: the tp degree; with sequence parallelism the hidden states a stage
    receives hold 1/tp of the sequence, and RoPE needs the full length."""
    if model.mtp is not None:
        raise ValueError("pipeline parallelism does not support MTP in this version")
    keep = {str(i) for i in stage_layers(model.args.n_layers, pp, stage)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    first, last = stage == 0, stage == pp - 1
    if not first:
        model.embed = None
    if not last:
        model.norm = None
        model.output = None

    def stage_forward(x: torch.Tensor) -> torch.Tensor:
        if model.embed is not None:
            h, seqlen = model.embed_tokens(x), x.size(1)
        else:
            h, seqlen = x, x.size(1) * seq_shards
        freqs_cis = model.freqs_cis[:seqlen]
        for layer in model.layers.values():
            h = layer(h, freqs_cis)
        if model.output is not None:
            return model.output(model.norm(h))
        return h

    model.forward = stage_forward
    return model


class Pipeline:
    """One rank's stage and schedule. ``step`` runs one training micro-batch through the
    whole pipeline (forward and backward of every pipeline micro-batch)."""

    def __init__(self, module: torch.nn.Module, stage: int, mesh: DeviceMesh,
                 device: torch.device, schedule: str, n_microbatches: int, grad_accum: int,
                 batch_shape: tuple[int, int]):
        self.pp = mesh.size()
        self.first, self.last = stage == 0, stage == self.pp - 1
        self.loss_scale = 1.0 / (n_microbatches * grad_accum)
        self.stage = PipelineStage(module, stage, self.pp, device, group=mesh.get_group())
        loss_fn: Callable = self._loss
        self.schedule = SCHEDULES[schedule](self.stage, n_microbatches, loss_fn=loss_fn,
                                            scale_grads=False)
        zeros = torch.zeros(batch_shape, dtype=torch.long, device=device)
        self.step(zeros, zeros)  # shape inference
        for p in module.parameters():
            p.grad = None

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_cross_entropy(logits, targets) * self.loss_scale

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Returns the micro-batch's mean loss (unscaled) on the last stage, else None.

        The stages check each input against the shape, dtype and strides of the run
        that built them, and the data hands over slices of one token buffer
        (``batch[:, :-1]``, strided by seq_len + 1): the tensors are made contiguous
        here, as the zeros of that first run were."""
        inputs, targets = inputs.contiguous(), targets.contiguous()
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(inputs, target=targets if self.last else None, losses=losses)
        elif self.last:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        if not self.last:
            return None
        return torch.stack([x.detach() for x in losses]).mean() / self.loss_scale
