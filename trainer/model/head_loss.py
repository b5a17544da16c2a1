"""The output head and its cross-entropy as one op, ``dsk::head_loss``: the logits of the
whole micro-batch are made by one GEMM, and one pass over them computes each token's
loss and, in the same memory, the gradient of the summed loss with respect to its logits
(``softmax - one_hot``), which backward hands to the head's two GEMMs and then scales.

Compiled as a plain ``F.cross_entropy``, the loss read the bf16 logits once in forward
(for the log-sum-exp) and again in backward, where it also wrote their gradient beside
them: three passes over tokens x vocab elements, the forward's at about half the memory
bandwidth, and a second tokens x vocab tensor at the peak (docs/benchmarks.md). Here one
kernel reads each row once (twice for a vocabulary above ROW_MAX) and writes it once,
and backward reads nothing of the vocabulary but the gradient its GEMMs need anyway. The
op is opaque to torch.compile (``torch.library.custom_op``), so inductor neither splits
it nor copies the logits.

On the GPU the pass is a Triton kernel, a program per token; elsewhere (the CPU, or where
Triton is missing) the same arithmetic in torch, which is also what the kernel is tested
against. The loss and the softmax are computed in fp32 whatever the logits' dtype; the
gradient is stored in the logits' dtype, as autocast would hand it to the GEMMs.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from trainer.kernels import kernels_run, tl, triton

# A vocabulary of up to ROW_MAX entries is held whole by one program (ROW_WARPS warps: at
# most 64 entries a thread), so the pass reads each row once; a larger one is read BLOCK
# entries at a time, twice (NUM_WARPS warps, 16 entries a thread).
ROW_MAX = 32768
ROW_WARPS = 16
BLOCK = 4096
NUM_WARPS = 8


def loss_and_grad_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy (fp32, tokens), and ``logits`` overwritten with
    ``softmax(logits) - one_hot(targets)``: the arithmetic of the kernel, in torch."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    losses = lse - x.gather(1, targets.unsqueeze(1)).squeeze(1)
    grad = torch.exp(x - lse.unsqueeze(1))
    grad.scatter_add_(1, targets.unsqueeze(1),
                      torch.full((x.size(0), 1), -1.0, dtype=grad.dtype, device=grad.device))
    logits.copy_(grad)
    return losses


if triton is not None:

    @triton.jit
    def _row_of_program(logits_ptr, targets_ptr, stride):
        """This program's row: its index, where its logits start and its target."""
        row = tl.program_id(0).to(tl.int64)
        return row, logits_ptr + row * stride, tl.load(targets_ptr + row)


    @triton.jit
    def _store_loss(losses_ptr, row, base, target, lse):
        tl.store(losses_ptr + row, lse - tl.load(base + target).to(tl.float32))


    @triton.jit
    def _store_grad(base, idx, mask, target, probs):
        """``softmax - one_hot`` over one block of the row, written in the logits' place."""
        grad = tl.where(idx == target, probs - 1.0, probs)
        tl.store(base + idx, grad.to(base.dtype.element_ty), mask=mask)


    @triton.jit
    def _loss_and_grad_kernel(logits_ptr, targets_ptr, losses_ptr, vocab, stride,
                              block: tl.constexpr):
        row, base, target = _row_of_program(logits_ptr, targets_ptr, stride)
        cols = tl.arange(0, block)
        # per lane: the running maximum and the sum of exponentials below it
        high = tl.full([block], -float("inf"), tl.float32)
        total = tl.zeros([block], tl.float32)
        for start in range(0, vocab, block):
            idx = start + cols
            mask = idx < vocab
            x = tl.load(base + idx, mask=mask, other=-float("inf")).to(tl.float32)
            new_high = tl.maximum(high, x)
            # lanes past the vocabulary (and lanes that have seen only those) add nothing
            safe = tl.where(new_high == -float("inf"), 0.0, new_high)
            total = total * tl.exp(high - safe) + tl.where(mask, tl.exp(x - safe), 0.0)
            high = new_high
        top = tl.max(high, 0)
        lse = top + tl.log(tl.sum(total * tl.exp(high - top), 0))
        _store_loss(losses_ptr, row, base, target, lse)
        for start in range(0, vocab, block):
            idx = start + cols
            mask = idx < vocab
            x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            _store_grad(base, idx, mask, target, tl.exp(x - lse))


    @triton.jit
    def _loss_and_grad_row_kernel(logits_ptr, targets_ptr, losses_ptr, vocab, stride,
                                  block: tl.constexpr):
        row, base, target = _row_of_program(logits_ptr, targets_ptr, stride)
        idx = tl.arange(0, block)
        mask = idx < vocab
        x = tl.load(base + idx, mask=mask, other=-float("inf")).to(tl.float32)
        top = tl.max(x, 0)
        e = tl.exp(x - top)
        total = tl.sum(e, 0)
        _store_loss(losses_ptr, row, base, target, top + tl.log(total))
        _store_grad(base, idx, mask, target, e / total)


def loss_and_grad_(logits: torch.Tensor, targets: torch.Tensor, *,
                   whole_rows: bool | None = None) -> torch.Tensor:
    """Each row's cross-entropy (fp32), and ``logits`` (tokens x vocab, contiguous rows)
    overwritten with the gradient of their sum: a Triton kernel on the GPU, else the
    reference. ``whole_rows`` picks the kernel (None: whole rows up to ROW_MAX)."""
    if not kernels_run(logits):
        return loss_and_grad_reference(logits, targets)
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if whole_rows is None:
        whole_rows = vocab <= ROW_MAX
    if whole_rows:
        _loss_and_grad_row_kernel[(rows,)](logits, targets, losses, vocab, logits.stride(0),
                                           triton.next_power_of_2(vocab),
                                           num_warps=ROW_WARPS)
    else:
        _loss_and_grad_kernel[(rows,)](logits, targets, losses, vocab, logits.stride(0),
                                       BLOCK, num_warps=NUM_WARPS)
    return losses


@torch.library.custom_op("dsk::head_loss", mutates_args=())
def _head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = h @ weight.t()
    losses = loss_and_grad_(logits, targets.contiguous())
    return losses.sum(), logits


@_head_loss.register_fake
def _head_loss_fake(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return (h.new_empty((), dtype=torch.float32),
            h.new_empty(h.size(0), weight.size(0)))


def _setup(ctx, inputs, output) -> None:
    h, weight, _ = inputs
    ctx.save_for_backward(h, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss: torch.Tensor, _grad_logits):
    h, weight, grad_logits = ctx.saved_tensors
    # The scale (1 / tokens for a mean, the MTP weight) goes on the GEMMs' outputs, tokens
    # x dim and vocab x dim, rather than on the tokens x vocab gradient.
    grad_h = (grad_logits @ weight) * grad_loss
    grad_weight = (grad_logits.t() @ h) * grad_loss
    return grad_h, grad_weight, None


_head_loss.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.dsk.head_loss)
def _head_loss_flops(h_shape, weight_shape, targets_shape, *args, **kwargs) -> int:
    """The logits' GEMM, for torch's FLOP counter (the op hides it; backward's GEMMs are
    ordinary matmuls the counter sees)."""
    return 2 * h_shape[0] * h_shape[1] * weight_shape[0]


def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) of ``h @ weight.T`` against ``targets``: h (tokens, dim)
    and weight (vocab, dim) in one dtype, the GEMMs' (the caller casts them as autocast
    would), targets (tokens,) of class indices."""
    loss_sum, _ = torch.ops.dsk.head_loss(h.contiguous(), weight, targets)
    return loss_sum / h.size(0)


def cross_entropy_head(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
                       ) -> torch.Tensor:
    """The same loss written plainly, the head as a matmul and ``F.cross_entropy`` in fp32:
    what the op is compared with."""
    return torch.nn.functional.cross_entropy((h @ weight.t()).float(), targets)


def loss_and_grads(fn, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fn(h, weight, targets) * scale`` (``head_loss``, ``cross_entropy_head`` or either
    compiled), its backward run on copies of h and weight: the loss and their gradients,
    to compare one form of the head's loss with another."""
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, weight, targets) * scale
    loss.backward()
    return loss.detach(), h.grad, weight.grad

