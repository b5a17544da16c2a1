"""The MoE layer's two moves of token rows, and their kernels on the GPU.

The routing gives each token ``topk`` slots (slot t * topk + k: token t's k-th expert).
``sort_slots`` groups the slots by expert: row i of that grouping is slot ``order[i]``,
and ``rank`` is ``order``'s inverse (the row each slot lands in).

- **dispatch**: each token's row repeated top-k times, in expert order (T, D) -> (T * topk,
  D): row i is token ``order[i] // topk``. Backward: each token's k rows of the gradient
  summed, found through ``rank``.
- **combine**: the experts' rows back per token, weighted by the gate and summed
  (T * topk, D) -> (T, D): token t is the sum over k of ``weights[t, k]`` times row
  ``rank[t * topk + k]``. Backward: the gradient of each row (its token's gradient times
  its weight) and of each weight (the dot product of its token's gradient with its row).

Written plainly (``dispatch_reference``, ``combine_reference``) both are gathers by a
permutation forward and backward (``PermuteRows``), which torch.compile fuses with the
norms and sums around them. On the GPU each move is a Triton kernel forward and backward
instead, registered as custom ops (torch.library.triton_op) that torch.compile keeps; on
an H100 they take 2.55 ms against 3.33 for the compiled gathers at wide.toml's widths and
1.36 against 1.66 at small.toml's (micro-batch 12), forward and backward
(docs/benchmarks.md). Each kernel walks the tokens, so a token's row, or its gradient, is
read once and its k expert rows are read or written where ``rank`` puts them:

- dispatch forward: each token's row written to its k rows;
- dispatch backward and combine forward: one kernel, a token's k rows gathered and summed
  (weighted for the combine) in fp32;
- combine backward: each token's gradient read once, each of its k rows' gradients (the
  gradient times the weight) written and each weight's gradient (the dot product with
  the row) computed.

Only ``rank`` reaches the kernels; ``order`` serves the plain forms.

A program moves a tile of whole rows (``TILE`` elements). On the CPU, or where Triton is
missing, the plain forms run; they are also what the kernels are tested against.
"""

from __future__ import annotations

import torch

from trainer.kernels import kernels_run, tl, triton, triton_op, wrap_triton

# elements of rows one program moves (whole rows: at least one row however wide)
TILE = 4096
NUM_WARPS = 8


class PermuteRows(torch.autograd.Function):
    """``x``'s rows in the order ``index``, a permutation of them; ``inverse`` is its
    inverse. The backward is a gather too (the gradient's rows taken back by ``inverse``),
    so under torch.compile each direction fuses with what feeds it or reads it (the MoE's
    combine becomes one gather-multiply-sum), and neither needs atomic adds, which
    index_select's own backward (index_add) would use."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def sort_slots(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing's slots (``indices`` (T, topk): each token's experts) grouped by expert:
    each slot's expert in that grouping, ``order`` and its inverse ``rank``."""
    by_expert, order = indices.flatten().sort(stable=True)
    return by_expert, order, inverse_permutation(order)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``rank`` with ``rank[order[i]] == i``: where each element of a permutation lands."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def dispatch_reference(x: torch.Tensor, topk: int, order: torch.Tensor, rank: torch.Tensor
                       ) -> torch.Tensor:
    """The dispatch written plainly (the CPU's, and what the kernels are tested against)."""
    slots = x.unsqueeze(1).expand(-1, topk, -1).reshape(-1, x.size(-1))
    return PermuteRows.apply(slots, order, rank)


def dispatch_backward_reference(grad: torch.Tensor, rank: torch.Tensor, topk: int
                                ) -> torch.Tensor:
    """The dispatch's backward written plainly: each token's ``topk`` rows of ``grad``
    summed (in float32, as the kernel sums them)."""
    rows = grad.float().index_select(0, rank).view(-1, topk, grad.size(-1))
    return rows.sum(dim=1).to(grad.dtype)


def combine_reference(y_sorted: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                      rank: torch.Tensor) -> torch.Tensor:
    """The combine written plainly: one gather-multiply-sum under torch.compile."""
    y = PermuteRows.apply(y_sorted, rank, order)
    topk = weights.size(-1)
    return (y.view(-1, topk, y.size(-1)) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)


def row_tile(dim: int) -> tuple[int, int]:
    """Rows per program and the row's power-of-two width for rows of ``dim`` elements."""
    width = triton.next_power_of_2(dim)
    return max(1, TILE // width), width


if triton is not None:

    @triton.jit
    def token_tile(n_tokens, dim, rows: tl.constexpr, width: tl.constexpr):
        """This program's tile of ``rows`` tokens of ``dim`` columns (``width``, a power of
        two, wide): the tokens t, which of them exist, the columns and the tile's mask."""
        t = tl.program_id(0).to(tl.int64) * rows + tl.arange(0, rows)
        live = t < n_tokens
        cols = tl.arange(0, width)
        return t, live, cols, live[:, None] & (cols < dim)[None, :]

    @triton.jit
    def _scatter_rows_kernel(x_ptr, rank_ptr, out_ptr, n_tokens, dim, topk: tl.constexpr,
                             rows: tl.constexpr, width: tl.constexpr):
        """out[rank[t * topk + k]] = x[t] for each k, for a tile of tokens t: each token's
        row is read once and written top-k times."""
        t, live, cols, mask = token_tile(n_tokens, dim, rows, width)
        v = tl.load(x_ptr + t[:, None] * dim + cols[None, :], mask=mask)
        for k in tl.static_range(topk):
            dst = tl.load(rank_ptr + t * topk + k, mask=live, other=0)
            tl.store(out_ptr + dst[:, None] * dim + cols[None, :], v, mask=mask)

    @triton.jit
    def _gather_sum_kernel(y_ptr, rank_ptr, w_ptr, out_ptr, n_tokens, dim,
                           topk: tl.constexpr, weighted: tl.constexpr,
                           rows: tl.constexpr, width: tl.constexpr):
        """out[t] = sum over k of (w[t, k] *) y[rank[t * topk + k]], products and sum in
        fp32 (the plain form rounds each product to the rows' dtype first)."""
        t, live, cols, mask = token_tile(n_tokens, dim, rows, width)
        acc = tl.zeros([rows, width], tl.float32)
        for k in tl.static_range(topk):
            src = tl.load(rank_ptr + t * topk + k, mask=live, other=0)
            v = tl.load(y_ptr + src[:, None] * dim + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            if weighted:
                v = v * tl.load(w_ptr + t * topk + k, mask=live, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(out_ptr + t[:, None] * dim + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def combine_backward_slot(g, y_ptr, w_ptr, rank_ptr, grad_y_ptr, grad_w_ptr, s, live, cols,
                              mask, dim):
        """The combine's backward for the slots s of a tile of tokens whose gradient
        (float32) is g: the expert rows i = rank[s] get grad_y[i] = g * w[s], and
        grad_w[s] = <g, y[i]>. It returns nothing: see the FP8 combine's backward
        (trainer.model.fp8_experts), which writes these lines out rather than store
        through an address computed here."""
        i = tl.load(rank_ptr + s, mask=live, other=0)
        at = i[:, None] * dim + cols[None, :]
        y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + s, mask=live, other=0.0).to(tl.float32)
        gy = (g * w[:, None]).to(grad_y_ptr.dtype.element_ty)
        tl.store(grad_y_ptr + at, gy, mask=mask)
        tl.store(grad_w_ptr + s, tl.sum(g * y, axis=1), mask=live)

    @triton.jit
    def _combine_backward_kernel(grad_ptr, y_ptr, w_ptr, rank_ptr, grad_y_ptr, grad_w_ptr,
                                 n_tokens, dim, topk: tl.constexpr, rows: tl.constexpr,
                                 width: tl.constexpr):
        """For a tile of tokens t, each of their slots s = t * topk + k and its expert row
        i = rank[s]: grad_y[i] = grad[t] * w[s] and grad_w[s] = <grad[t], y[i]>. Each
        token's gradient is read once."""
        t, live, cols, mask = token_tile(n_tokens, dim, rows, width)
        g = tl.load(grad_ptr + t[:, None] * dim + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        for k in tl.static_range(topk):
            combine_backward_slot(g, y_ptr, w_ptr, rank_ptr, grad_y_ptr, grad_w_ptr, t * topk + k,
                                  live, cols, mask, dim)

    def _gather_sum(y: torch.Tensor, rank: torch.Tensor, weights: torch.Tensor | None,
                    tokens: int, topk: int) -> torch.Tensor:
        dim = y.size(1)
        out = y.new_empty(tokens, dim)
        if tokens == 0:
            return out
        rows, width = row_tile(dim)
        wrap_triton(_gather_sum_kernel)[(triton.cdiv(tokens, rows),)](
            y, rank, y if weights is None else weights, out, tokens, dim, topk,
            weights is not None, rows, width, num_warps=NUM_WARPS)
        return out

    @triton_op("dsk::moe_dispatch", mutates_args=())
    def _dispatch(x: torch.Tensor, rank: torch.Tensor, topk: int) -> torch.Tensor:
        tokens, dim = x.shape
        out = x.new_empty(rank.numel(), dim)
        if tokens == 0:
            return out
        rows, width = row_tile(dim)
        wrap_triton(_scatter_rows_kernel)[(triton.cdiv(tokens, rows),)](
            x, rank, out, tokens, dim, topk, rows, width, num_warps=NUM_WARPS)
        return out

    @triton_op("dsk::moe_dispatch_backward", mutates_args=())
    def _dispatch_backward(grad: torch.Tensor, rank: torch.Tensor, topk: int
                           ) -> torch.Tensor:
        return _gather_sum(grad, rank, None, rank.numel() // topk, topk)

    @triton_op("dsk::moe_combine", mutates_args=())
    def _combine(y_sorted: torch.Tensor, weights: torch.Tensor, rank: torch.Tensor
                 ) -> torch.Tensor:
        return _gather_sum(y_sorted, rank, weights, weights.size(0), weights.size(1))

    @triton_op("dsk::moe_combine_backward", mutates_args=())
    def _combine_backward(grad: torch.Tensor, y_sorted: torch.Tensor, weights: torch.Tensor,
                          rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = y_sorted.size(1)
        tokens, topk = weights.shape
        grad_y = torch.empty_like(y_sorted)
        grad_w = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
        if tokens == 0:
            return grad_y, grad_w.to(weights.dtype)
        rows, width = row_tile(dim)
        wrap_triton(_combine_backward_kernel)[(triton.cdiv(tokens, rows),)](
            grad, y_sorted, weights, rank, grad_y, grad_w, tokens, dim, topk,
            rows, width, num_warps=NUM_WARPS)
        return grad_y, grad_w.to(weights.dtype)

    def _dispatch_setup(ctx, inputs, output) -> None:
        _, rank, topk = inputs
        ctx.save_for_backward(rank)
        ctx.topk = topk

    def _dispatch_grad(ctx, grad: torch.Tensor):
        (rank,) = ctx.saved_tensors
        return dispatch_backward(grad, rank, ctx.topk), None, None

    def _combine_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def _combine_grad(ctx, grad: torch.Tensor):
        y_sorted, weights, rank = ctx.saved_tensors
        grad_y, grad_w = torch.ops.dsk.moe_combine_backward(grad.contiguous(), y_sorted,
                                                             weights, rank)
        return grad_y, grad_w, None

    _dispatch.register_autograd(_dispatch_grad, setup_context=_dispatch_setup)
    _combine.register_autograd(_combine_grad, setup_context=_combine_setup)


def dispatch(x: torch.Tensor, topk: int, order: torch.Tensor, rank: torch.Tensor
             ) -> torch.Tensor:
    """Each token's row (x: (T, D)) repeated top-k times, in expert order: row i is token
    ``order[i] // topk``; ``rank`` is ``order``'s inverse."""
    if kernels_run(x):
        return torch.ops.dsk.moe_dispatch(x.contiguous(), rank, topk)
    return dispatch_reference(x, topk, order, rank)


def dispatch_backward(grad: torch.Tensor, rank: torch.Tensor, topk: int) -> torch.Tensor:
    """The dispatch's backward outside autograd (an autograd function that holds the
    dispatch calls it): each token's ``topk`` rows of ``grad`` (T * topk, D) summed."""
    if kernels_run(grad):
        return torch.ops.dsk.moe_dispatch_backward(grad.contiguous(), rank, topk)
    return dispatch_backward_reference(grad, rank, topk)


def combine(y_sorted: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
            rank: torch.Tensor) -> torch.Tensor:
    """The experts' rows (in expert order) back per token, weighted by the gate (weights:
    (T, topk)) and summed: (T * topk, D) -> (T, D), in the rows' dtype."""
    if kernels_run(y_sorted):
        return torch.ops.dsk.moe_combine(y_sorted.contiguous(), weights.contiguous(), rank)
    return combine_reference(y_sorted, weights, order, rank)
