"""SwiGLU of the routed experts on the GPU: ``silu(h[:, :I]) * h[:, I:]`` of the grouped
GEMM's output ``h`` (w1 and w3 side by side), forward and backward each one Triton kernel.

The backward reads ``h`` and the incoming gradient once and writes the gradient of ``h``
in the layout the grouped GEMM's backward takes (both halves side by side), where the
compiled elementwise code ran at about half the memory bandwidth (docs/benchmarks.md).
Registered as custom ops (torch.library.triton_op) so that torch.compile keeps them in
its graph. On the CPU, or where Triton is missing, ``swiglu`` is the plain expression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.kernels import kernels_run, tl, triton, triton_op, wrap_triton

# elements of the output each program handles; memory-bound, so large blocks
BLOCK = 2048


def reference(h: torch.Tensor) -> torch.Tensor:
    """The plain expression (CPU, and what the kernels are tested against)."""
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


if triton is not None:

    @triton.jit
    def _forward_kernel(h_ptr, out_ptr, n, inter, block: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
        mask = idx < n
        row, col = idx // inter, idx % inter
        a = tl.load(h_ptr + row * 2 * inter + col, mask=mask).to(tl.float32)
        b = tl.load(h_ptr + row * 2 * inter + inter + col, mask=mask).to(tl.float32)
        out = a * tl.sigmoid(a) * b
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(h_ptr, g_ptr, dh_ptr, n, inter, block: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
        mask = idx < n
        row, col = idx // inter, idx % inter
        at = row * 2 * inter + col
        a = tl.load(h_ptr + at, mask=mask).to(tl.float32)
        b = tl.load(h_ptr + at + inter, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
        s = tl.sigmoid(a)
        silu = a * s
        da = g * b * s * (1.0 + a * (1.0 - s))  # d silu(a) / da = s (1 + a (1 - s))
        db = g * silu
        tl.store(dh_ptr + at, da.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + at + inter, db.to(dh_ptr.dtype.element_ty), mask=mask)

    @triton_op("dsk::swiglu", mutates_args=())
    def _swiglu(h: torch.Tensor) -> torch.Tensor:
        rows, inter = h.shape[0], h.shape[1] // 2
        out = h.new_empty(rows, inter)
        n = rows * inter
        wrap_triton(_forward_kernel)[(triton.cdiv(n, BLOCK),)](h, out, n, inter, BLOCK,
                                                              num_warps=8)
        return out

    @triton_op("dsk::swiglu_backward", mutates_args=())
    def _swiglu_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        rows, inter = h.shape[0], h.shape[1] // 2
        dh = torch.empty_like(h)
        n = rows * inter
        wrap_triton(_backward_kernel)[(triton.cdiv(n, BLOCK),)](h, grad, dh, n, inter,
                                                               BLOCK, num_warps=8)
        return dh

    def _setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    def _backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        return torch.ops.dsk.swiglu_backward(h, grad.contiguous())

    _swiglu.register_autograd(_backward, setup_context=_setup)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``h`` = [a | b] along its last dimension (2-D on the GPU)."""
    if not kernels_run(h) or h.dim() != 2:
        return reference(h)
    return torch.ops.dsk.swiglu(h.contiguous())
