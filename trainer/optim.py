"""The optimizer and its learning-rate schedule: AdamW with decoupled weight decay on the
matrices only, linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

from trainer.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update of 0-based step ``step``: linear warmup
    over ``warmup`` steps, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, cfg: TrainConfig):
    """AdamW over ``model``'s trainable parameters (no weight decay on vectors: norms,
    biases) and its LambdaLR scheduler, from cfg.training."""
    import torch

    from trainer.adamw import AdamW

    t = cfg.training
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # trainer/adamw.py: torch's fused AdamW, run on the local tensors of sharded (DTensor)
    # parameters, with the update in a Triton kernel on the GPU
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                      moments_dtype=getattr(torch, t.moments_dtype))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    return optimizer, scheduler
