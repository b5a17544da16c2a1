"""Single-device model code; parallelism is applied from outside (trainer.parallel)."""

from trainer.model.model import (
    MLA,
    MLP,
    MTP,
    Block,
    Gate,
    GroupedExperts,
    LossOutput,
    ModelArgs,
    MoE,
    RMSNorm,
    Transformer,
    count_params,
    flops_per_token,
    lm_cross_entropy,
)

__all__ = [
    "MLA", "MLP", "MTP", "Block", "Gate", "GroupedExperts", "LossOutput", "ModelArgs", "MoE",
    "RMSNorm", "Transformer", "count_params", "flops_per_token", "lm_cross_entropy",
]
