"""Parallelism, applied from outside the model: ParallelDims and parallelize()."""

from trainer.parallel.apply import parallelize
from trainer.parallel.dims import ParallelDims

__all__ = ["ParallelDims", "parallelize"]
