"""Triton, where torch's wheel brings it (the GPU wheels do; the CPU ones do not): the one
place the trainer's kernel modules import it from, and the one rule for when their
kernels run.

Each kernel module defines its kernels under ``if triton is not None:`` and, where the
rule below says no, runs its plain torch expression instead (which is also what its
kernels are tested against).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - depends on the wheel
    triton = tl = triton_op = wrap_triton = None


def kernels_run(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``tensors``: Triton is there and all of them
    are on a CUDA device."""
    return triton is not None and all(t.is_cuda for t in tensors)
