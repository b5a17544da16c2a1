"""Parallelism, applied from outside the model: ParallelDims and parallelize()."""

from trainer.parallel.apply import clip_grad_norm, parallelize
from trainer.parallel.dims import ParallelDims

__all__ = ["ParallelDims", "clip_grad_norm", "parallelize"]
