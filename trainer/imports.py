"""The third-party modules that a training run imports on a node, for the check before
the launch (dsk_provision.preflight): a node that lacks one is named before torchrun
starts, instead of a rank ending in a traceback.

This module must stay free of torch: the control node reads it.
"""

from __future__ import annotations

# Imported by every run (the model, the parallel code, the data, the config's schema).
ALWAYS = ("torch", "numpy", "jsonschema")


def modules_for(cfg) -> list[str]:
    """What a run of ``cfg`` (a TrainConfig) imports besides the standard library and the
    trainer itself."""
    out = list(ALWAYS)
    if cfg.metrics.tensorboard:
        out.append("tensorboard")  # torch.utils.tensorboard needs it
    if cfg.training.fp8 != "off":
        out.append("torchao")
    return out
