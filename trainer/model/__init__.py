"""Single-device model code; parallelism is applied from outside (trainer.parallel).

``trainer.model.args`` (ModelArgs) imports no torch, so the config loader reads it on the
control node; the torch modules load on first use of any other name of this package.
"""

from __future__ import annotations

import importlib
from typing import Any

from trainer.model.args import ModelArgs

_FROM_MODEL = {
    "MLA", "MLP", "MTP", "Block", "Gate", "GroupedExperts", "LossOutput", "MoE", "RMSNorm",
    "Transformer", "count_params", "flops_per_token", "lm_cross_entropy",
}

__all__ = ["ModelArgs", *sorted(_FROM_MODEL)]


def __getattr__(name: str) -> Any:
    if name in _FROM_MODEL:
        return getattr(importlib.import_module("trainer.model.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
