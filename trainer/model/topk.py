"""The router's choice of experts on the GPU: the indices of each row's k largest scores,
one Triton kernel.

torch.topk runs a radix selection per row and then sorts the k it found; for the routers'
short rows (tens to a few hundred experts) that took 0.198 ms for 49,152 rows of 48 scores
on an H100, where one program holding 64 whole rows and taking the row maximum k times
takes 0.062 ms, and small.toml's step gained 0.8% (docs/benchmarks.md). The indices come
out in the order of their scores, largest first, as torch.topk's do; among equal scores
the lowest index comes first, and a NaN counts as larger than any number, as in
torch.topk.

Registered as a custom op (torch.library.triton_op) so that torch.compile keeps it in its
graph. The indices carry no gradient, so the op has no backward: the gate's weights are
gathered from the scores by these indices outside it. On the CPU, or where Triton is
missing, ``top_k`` is torch.topk.
"""

from __future__ import annotations

import torch

from trainer.kernels import kernels_run, tl, triton, triton_op, wrap_triton

# rows one program holds whole (each row padded to a power of two), and its warps
ROWS = 64
NUM_WARPS = 4


def reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk's indices (CPU, and what the kernel is tested against)."""
    return scores.topk(k, dim=-1)[1]


if triton is not None:

    @triton.jit
    def _top_k_kernel(scores_ptr, out_ptr, n_rows, n_cols, k: tl.constexpr,
                      block_cols: tl.constexpr, rows: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * rows + tl.arange(0, rows)
        col = tl.arange(0, block_cols)
        row_ok = row < n_rows
        inside = row_ok[:, None] & (col[None, :] < n_cols)
        s = tl.load(scores_ptr + row[:, None] * n_cols + col[None, :], mask=inside,
                    other=float("-inf")).to(tl.float32)
        s = tl.where(s != s, float("inf"), s)  # NaN above everything, as torch.topk
        # a column is free until it is taken; padding is never free, so a row of -inf
        # scores still yields k distinct columns
        free = inside
        for j in tl.static_range(k):
            best = tl.max(tl.where(free, s, float("-inf")), axis=1)
            pick = tl.min(tl.where(free & (s == best[:, None]), col[None, :], block_cols),
                          axis=1)
            tl.store(out_ptr + row * k + j, pick.to(tl.int64), mask=row_ok)
            free = free & (col[None, :] != pick[:, None])

    @triton_op("dsk::top_k", mutates_args=())
    def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
        n_rows, n_cols = scores.shape
        out = torch.empty(n_rows, k, dtype=torch.long, device=scores.device)
        wrap_triton(_top_k_kernel)[(triton.cdiv(n_rows, ROWS),)](
            scores, out, n_rows, n_cols, k, triton.next_power_of_2(n_cols), ROWS,
            num_warps=NUM_WARPS)
        return out


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices (rows, k) of each row's k largest ``scores`` (rows, columns), largest
    first. The kernel on the GPU for 2-D scores with k <= columns; torch.topk elsewhere."""
    if not kernels_run(scores) or scores.dim() != 2 or not 0 < k <= scores.size(1):
        return reference(scores, k)
    return torch.ops.dsk.top_k(scores.detach().contiguous(), k)
