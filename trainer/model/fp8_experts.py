"""The routed experts' grouped GEMMs in FP8 (``training.fp8_experts = "rowwise"``).

Four of the six grouped GEMMs of a MoE layer run in FP8 (e4m3 operands, float32 scales,
bf16 out) through ``torch._scaled_grouped_mm``: both forward GEMMs and both input
gradients. The weight gradients stay bf16 grouped GEMMs: their scales would have to run
along each expert's token group, and they keep the weights' updates as precise as bf16
training's. The weights are quantised once per step, in the forward, per output row;
every activation-side operand per row (per token):

- the tokens (forward of w1|w3): each token's row, once per token, inside the MoE's
  dispatch kernel as it is written to its top-k expert rows (``Fp8MoEFunction``); under
  expert parallelism, whose all-to-alls run between the dispatch and the experts, in a
  kernel of its own;
- the SwiGLU's output (forward of w2): quantised inside the SwiGLU's own forward kernel,
  which reads and writes those rows anyway (the bf16 copy w2's weight gradient needs
  comes from the same kernel);
- the input gradients reuse the forward's e4m3 weights, transposed (a copy of one byte
  per element) for the GEMM's column-major operand. Their per-row scales run along what
  those GEMMs contract (the weights' output rows), so they are folded into the other
  operand before it is quantised: the output gradient's columns, and in the SwiGLU's
  backward kernel the columns of the gradient of w1|w3's output, are multiplied by the
  inverse scales of the weight rows of their token's expert. The weights are read once
  per step from their master copies (fp32, or bf16 under FSDP2's bf16 gathering), where
  a cast per input column in the backward read them twice more. The output gradient's
  rows are quantised inside the combine's backward kernel as it writes them (or, under
  expert parallelism, in a kernel of their own).

Scales are powers of two (the largest with ``amax * scale <= 448``), so scaling and its
inverse are exact and only the cast to e4m3 rounds. The GEMMs accumulate with CUTLASS's
fast accumulation. On the CPU every kernel has a plain torch expression (the
``*_reference`` functions, which the GPU kernels are tested against), and the scaled
grouped GEMM is emulated on the dequantised operands, so the autograd arithmetic is
tested without a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.kernels import kernels_run, tl, triton, triton_op, wrap_triton
from trainer.model.model import GroupedExperts
from trainer.model.permute import (
    NUM_WARPS,
    combine,
    dispatch_backward,
    dispatch_reference,
    row_tile,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
TINY = 1e-12  # amax floor: an all-zero row gets a finite scale
EXPONENT_BITS = 0x7F800000  # float32 sign 0, exponent kept, mantissa cleared
FAST_ACCUM = True
ALIGN = 16  # _scaled_grouped_mm's widths must be multiples of 16
CAPABILITIES = ((9, 0), (10, 0))  # the GPUs torch builds _scaled_grouped_mm's kernels for


# ---- the plain expressions (CPU, and what the kernels are tested against) ----

def pow2_scale_reference(amax: torch.Tensor) -> torch.Tensor:
    """The largest power of two ``s`` with ``amax * s <= 448`` (float32)."""
    scale = FP8_MAX / amax.float().clamp(min=TINY)
    return (scale.view(torch.int32) & EXPONENT_BITS).view(torch.float32)


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def expert_of_rows(offs: torch.Tensor, rows: int) -> torch.Tensor:
    """Each of ``rows`` rows' expert, the groups of rows ending at ``offs``."""
    return torch.searchsorted(offs, torch.arange(rows, device=offs.device, dtype=offs.dtype),
                              right=True)


def rows_reference(x: torch.Tensor, col: torch.Tensor | None = None,
                   offs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., K) in e4m3, scaled per row; and each row's inverse scale (...). With
    ``col`` (E, K): x (M, K) in groups of rows ending at ``offs``, each row multiplied by
    its expert's row of ``col`` (in float32) before it is quantised."""
    x = x.float()
    if col is not None:
        x = x * col.float()[expert_of_rows(offs, x.size(0))]
    scale = pow2_scale_reference(x.abs().amax(dim=-1))
    return _cast(x, scale.unsqueeze(-1)), scale.reciprocal()


def weight_rows_reference(a: torch.Tensor, b: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (E, N, K) (``b`` stacked after ``a`` along N): e4m3 (E, N, K) per row, and
    the inverse scales (E, N). The forward GEMM's operand (its transposed view); the
    input gradient's, transposed, with the scales folded into the other operand."""
    return rows_reference(a if b is None else torch.cat([a, b], dim=1))


def swiglu_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``silu(h1) * h3`` of h = [h1 | h3] (M, 2I): in h's dtype, and in e4m3 with its
    rows' inverse scales, both from the float32 result."""
    x, y = h.float().chunk(2, dim=-1)
    out = torch.nn.functional.silu(x) * y
    q, inv = rows_reference(out)
    return out.to(h.dtype), q, inv


def swiglu_backward_reference(h: torch.Tensor, grad: torch.Tensor,
                              col: torch.Tensor | None = None, offs: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of ``swiglu`` at ``h`` for the output gradient ``grad`` (M, I): (M, 2I)
    in h's dtype, and in e4m3 with its rows' inverse scales (over both halves), times
    ``col`` per expert as in ``rows_reference``."""
    x, y = h.float().chunk(2, dim=-1)
    g = grad.float()
    s = torch.sigmoid(x)
    dh = torch.cat([g * y * s * (1 + x * (1 - s)), g * x * s], dim=-1)
    q, inv = rows_reference(dh, col, offs)
    return dh.to(h.dtype), q, inv


def dispatch_fp8_reference(x: torch.Tensor, topk: int, order: torch.Tensor,
                           rank: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE's dispatch (trainer.model.permute) of tokens ``x`` (T, D), and its rows in
    e4m3 with their inverse scales, as ``rows_reference`` quantises them (a token's
    ``topk`` rows are copies of it, so each token is quantised once)."""
    routed = dispatch_reference(x, topk, order, rank)
    return (routed, *rows_reference(routed))


def combine_backward_fp8_reference(grad: torch.Tensor, y_sorted: torch.Tensor,
                                   weights: torch.Tensor, rank: torch.Tensor,
                                   col: torch.Tensor, offs: torch.Tensor
                                   ) -> tuple[torch.Tensor, ...]:
    """The MoE's combine backward for the token gradient ``grad`` (T, D): each expert row's
    gradient (its token's gradient times the gate weight, in y_sorted's dtype), each
    weight's (the row's dot product with its token's gradient, float32, in the weights'
    dtype); and the row gradients in e4m3 as ``rows_reference`` quantises them with
    ``col`` and ``offs``."""
    tokens, topk = weights.shape
    g = grad.float().repeat_interleave(topk, dim=0)  # slot s = t * topk + k
    grad_y = torch.empty_like(y_sorted)
    grad_y[rank] = (g * weights.float().reshape(-1, 1)).to(y_sorted.dtype)
    grad_w = (g * y_sorted.float().index_select(0, rank)).sum(dim=-1).view(tokens, topk)
    return (grad_y, grad_w.to(weights.dtype), *rows_reference(grad_y, col, offs))


def scaled_grouped_mm_reference(a: torch.Tensor, b: torch.Tensor, a_inv: torch.Tensor,
                                b_inv: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """What ``torch._scaled_grouped_mm`` computes, on the dequantised operands: a (M, K)
    e4m3 with a_inv (M,), b (E, K, N) e4m3 with b_inv (E, N), groups of a's rows ending at
    ``offs``; bf16 (M, N)."""
    lhs = a.float() * a_inv.unsqueeze(-1)
    rhs = b.float() * b_inv.unsqueeze(-2)
    return torch._grouped_mm(lhs, rhs, offs=offs).to(torch.bfloat16)


# ---- the kernels ----

def _rows_per_program(cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(cols)
    return max(1, 4096 // block), block


def _expert_args(x: torch.Tensor, col: torch.Tensor | None, offs: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The kernels' (col, offs, experts, E) arguments: E = 0 when no ``col`` scales the
    rows (x stands in for the pointers the kernel then never reads)."""
    if col is None:
        return x, x, 0, 0
    return col, offs, offs.numel(), triton.next_power_of_2(offs.numel())


if triton is not None:
    from trainer.model.permute import token_tile

    # the same constants, as the kernels read them
    _MAX = tl.constexpr(FP8_MAX)
    _TINY = tl.constexpr(TINY)
    _EXPONENT = tl.constexpr(EXPONENT_BITS)

    @triton.jit
    def _pow2_scale(amax):
        scale = _MAX / tl.maximum(amax, _TINY)
        return (scale.to(tl.int32, bitcast=True) & _EXPONENT).to(tl.float32, bitcast=True)

    @triton.jit
    def _expert_cols(col_ptr, offs_ptr, n_experts, r, c, mask, ncols, E: tl.constexpr):
        # row e of col (n_experts, ncols) at columns c, for each row r's expert e: the
        # number of the groups' ends (offs) at or before r
        e = tl.arange(0, E)
        ends = tl.load(offs_ptr + e, mask=e < n_experts, other=2147483647)
        expert = tl.sum((ends[None, :] <= r[:, None]).to(tl.int64), axis=1)
        return tl.load(col_ptr + expert[:, None] * ncols + c[None, :], mask=mask, other=0.0)

    @triton.jit
    def _rows_kernel(x_ptr, q_ptr, inv_ptr, col_ptr, offs_ptr, n_experts, rows, cols,
                     x_stride, group, out_group, out_off,
                     R: tl.constexpr, BLOCK: tl.constexpr, E: tl.constexpr):
        # row r of x (rows, cols) -> row (r // group) * out_group + out_off + r % group of
        # q, and of the inverse scales: one tensor, or a slice of a stack of several;
        # with E > 0, each row times its expert's row of col first
        r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        c = tl.arange(0, BLOCK)
        live = r < rows
        mask = live[:, None] & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None] * x_stride + c[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if E > 0:
            x = x * _expert_cols(col_ptr, offs_ptr, n_experts, r, c, mask, cols, E)
        scale = _pow2_scale(tl.max(tl.abs(x), axis=1))
        q = tl.clamp(x * scale[:, None], -_MAX, _MAX)
        out = (r // group) * out_group + out_off + r % group
        tl.store(q_ptr + out[:, None] * cols + c[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(inv_ptr + out, 1.0 / scale, mask=live)

    @triton.jit
    def _transpose_kernel(x_ptr, out_ptr, n, k, BN: tl.constexpr, BK: tl.constexpr):
        # x (E, n, k) -> out (E, k, n), one tile of one expert per program, bytes as they are
        e = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        cols = tl.program_id(2) * BK + tl.arange(0, BK)
        mask = (rows[:, None] < n) & (cols[None, :] < k)
        tile = tl.load(x_ptr + e * n * k + rows[:, None].to(tl.int64) * k + cols[None, :],
                       mask=mask)
        at = e * n * k + cols[:, None].to(tl.int64) * n + rows[None, :]
        tl.store(out_ptr + at, tl.trans(tile), mask=tl.trans(mask))

    @triton.jit
    def _halves(h_ptr, rows, inter, R: tl.constexpr, BLOCK: tl.constexpr):
        # this program's R rows of h = [x | y] (rows, 2 inter), in float32: the rows, which
        # exist, the mask of the block, where x's elements are in h, x and y
        r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        c = tl.arange(0, BLOCK)
        live = r < rows
        mask = live[:, None] & (c[None, :] < inter)
        at = r[:, None] * 2 * inter + c[None, :]
        x = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(h_ptr + at + inter, mask=mask, other=0.0).to(tl.float32)
        return r, live, mask, at, x, y

    @triton.jit
    def _swiglu_kernel(h_ptr, out_ptr, q_ptr, inv_ptr, rows, inter,
                       R: tl.constexpr, BLOCK: tl.constexpr):
        r, live, mask, _at, x, y = _halves(h_ptr, rows, inter, R, BLOCK)
        out = x * tl.sigmoid(x) * y
        to = r[:, None] * inter + tl.arange(0, BLOCK)[None, :]
        tl.store(out_ptr + to, out.to(out_ptr.dtype.element_ty), mask=mask)
        scale = _pow2_scale(tl.max(tl.abs(out), axis=1))
        q = tl.clamp(out * scale[:, None], -_MAX, _MAX)
        tl.store(q_ptr + to, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(inv_ptr + r, 1.0 / scale, mask=live)

    @triton.jit
    def _swiglu_backward_kernel(h_ptr, g_ptr, dh_ptr, q_ptr, inv_ptr, col_ptr, offs_ptr,
                                n_experts, rows, inter,
                                R: tl.constexpr, BLOCK: tl.constexpr, E: tl.constexpr):
        r, live, mask, at, x, y = _halves(h_ptr, rows, inter, R, BLOCK)
        c = tl.arange(0, BLOCK)
        g = tl.load(g_ptr + r[:, None] * inter + c[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        s = tl.sigmoid(x)
        dx = g * y * s * (1.0 + x * (1.0 - s))  # d silu(x) / dx = s (1 + x (1 - s))
        dy = g * x * s
        tl.store(dh_ptr + at, dx.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + at + inter, dy.to(dh_ptr.dtype.element_ty), mask=mask)
        if E > 0:  # the e4m3 copy of each half times its expert's columns of col
            dx = dx * _expert_cols(col_ptr, offs_ptr, n_experts, r, c, mask, 2 * inter, E)
            dy = dy * _expert_cols(col_ptr + inter, offs_ptr, n_experts, r, c, mask,
                                   2 * inter, E)
        amax = tl.maximum(tl.max(tl.abs(dx), axis=1), tl.max(tl.abs(dy), axis=1))
        scale = _pow2_scale(amax)
        qx = tl.clamp(dx * scale[:, None], -_MAX, _MAX)
        qy = tl.clamp(dy * scale[:, None], -_MAX, _MAX)
        tl.store(q_ptr + at, qx.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_ptr + at + inter, qy.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(inv_ptr + r, 1.0 / scale, mask=live)

    @triton.jit
    def _dispatch_fp8_kernel(x_ptr, rank_ptr, out_ptr, q_ptr, inv_ptr, n_tokens, dim,
                             topk: tl.constexpr, rows: tl.constexpr, width: tl.constexpr):
        # the dispatch (trainer.model.permute's scatter) of a tile of tokens t, each
        # token's row quantised once and written, with the row, to its topk expert rows
        t, live, cols, mask = token_tile(n_tokens, dim, rows, width)
        v = tl.load(x_ptr + t[:, None] * dim + cols[None, :], mask=mask, other=0.0)
        f = v.to(tl.float32)
        scale = _pow2_scale(tl.max(tl.abs(f), axis=1))
        q = tl.clamp(f * scale[:, None], -_MAX, _MAX).to(q_ptr.dtype.element_ty)
        for k in tl.static_range(topk):
            dst = tl.load(rank_ptr + t * topk + k, mask=live, other=0)
            at = dst[:, None] * dim + cols[None, :]
            tl.store(out_ptr + at, v, mask=mask)
            tl.store(q_ptr + at, q, mask=mask)
            tl.store(inv_ptr + dst, 1.0 / scale, mask=live)

    @triton.jit
    def _combine_backward_fp8_kernel(grad_ptr, y_ptr, w_ptr, rank_ptr, grad_y_ptr, grad_w_ptr,
                                     q_ptr, inv_ptr, col_ptr, offs_ptr, n_experts, n_tokens,
                                     dim, topk: tl.constexpr, rows: tl.constexpr,
                                     width: tl.constexpr, E: tl.constexpr):
        # the combine's backward (trainer.model.permute) for a tile of tokens t, and each
        # expert row's gradient quantised as it is written: times its expert's row of
        # col, in e4m3 per row, from the gradient as stored (rounded to its dtype).
        # The slot's lines are permute.combine_backward_slot's, written out: the rows
        # this kernel stores e4m3 to are addressed by what they compute, and torch
        # 2.11's analysis of which tensors a kernel writes takes every pointer handed to
        # a called function as written where the caller stores through an address the
        # function returned (on the GPU, the compiled fused route then refused the gate
        # weights as a leaf modified in place)
        t, live, cols, mask = token_tile(n_tokens, dim, rows, width)
        g = tl.load(grad_ptr + t[:, None] * dim + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        for k in tl.static_range(topk):
            s = t * topk + k
            i = tl.load(rank_ptr + s, mask=live, other=0)
            at = i[:, None] * dim + cols[None, :]
            y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + s, mask=live, other=0.0).to(tl.float32)
            gy = (g * w[:, None]).to(grad_y_ptr.dtype.element_ty)
            tl.store(grad_y_ptr + at, gy, mask=mask)
            tl.store(grad_w_ptr + s, tl.sum(g * y, axis=1), mask=live)
            x = gy.to(tl.float32) * _expert_cols(col_ptr, offs_ptr, n_experts, i, cols, mask,
                                                 dim, E)
            scale = _pow2_scale(tl.max(tl.abs(x), axis=1))
            q = tl.clamp(x * scale[:, None], -_MAX, _MAX)
            tl.store(q_ptr + at, q.to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(inv_ptr + i, 1.0 / scale, mask=live)


def launch_rows(launch, x: torch.Tensor, q: torch.Tensor, inv: torch.Tensor,
                group: int = 0, out_group: int = 0, out_off: int = 0,
                col: torch.Tensor | None = None, offs: torch.Tensor | None = None) -> None:
    """Quantise the rows of ``x`` (2-D, or 3-D seen as its rows) into ``q`` and ``inv``;
    row r lands at (r // group) * out_group + out_off + r % group (default: at r). With
    ``col`` (E, K) and ``offs``, as ``rows_reference``. ``launch`` wraps the kernel
    (``wrap_triton`` inside a custom op; the kernel itself otherwise)."""
    cols = x.size(-1)
    x2 = x.reshape(-1, cols)
    rows = x2.size(0)
    if rows == 0:  # no token reached these experts (an expert-parallel rank can see none)
        return
    group = group or rows
    out_group = out_group or group
    per, block = _rows_per_program(cols)
    col, offs, experts, e_block = _expert_args(x2, col, offs)
    launch(_rows_kernel)[(triton.cdiv(rows, per),)](
        x2, q, inv, col, offs, experts, rows, cols, x2.stride(0), group, out_group, out_off,
        per, block, e_block, num_warps=8 if block >= 2048 else 4)


def launch_weight_rows(launch, a: torch.Tensor, b: torch.Tensor | None, q: torch.Tensor,
                       inv: torch.Tensor) -> None:
    """``weight_rows_reference`` into q (E, Na + Nb, K) and inv (E, Na + Nb)."""
    n = a.size(1) + (0 if b is None else b.size(1))
    launch_rows(launch, a, q, inv, a.size(1), n, 0)
    if b is not None:
        launch_rows(launch, b, q, inv, b.size(1), n, a.size(1))


def launch_transpose(launch, x: torch.Tensor, out: torch.Tensor) -> None:
    """x (E, N, K) -> out (E, K, N), both contiguous, one byte per element."""
    experts, n, k = x.shape
    if x.numel() == 0:
        return
    tile = 128
    launch(_transpose_kernel)[(experts, triton.cdiv(n, tile), triton.cdiv(k, tile))](
        x.view(torch.uint8), out.view(torch.uint8), n, k, tile, tile, num_warps=8)


def launch_swiglu(launch, h: torch.Tensor, out: torch.Tensor, q: torch.Tensor,
                  inv: torch.Tensor) -> None:
    rows, inter = h.size(0), h.size(1) // 2
    if rows == 0:
        return
    per, block = _rows_per_program(inter)
    launch(_swiglu_kernel)[(triton.cdiv(rows, per),)](
        h, out, q, inv, rows, inter, per, block, num_warps=8 if block >= 2048 else 4)


def launch_swiglu_backward(launch, h: torch.Tensor, grad: torch.Tensor, dh: torch.Tensor,
                           q: torch.Tensor, inv: torch.Tensor, col: torch.Tensor | None = None,
                           offs: torch.Tensor | None = None) -> None:
    rows, inter = h.size(0), h.size(1) // 2
    if rows == 0:
        return
    per, block = _rows_per_program(inter)
    col, offs, experts, e_block = _expert_args(h, col, offs)
    launch(_swiglu_backward_kernel)[(triton.cdiv(rows, per),)](
        h, grad, dh, q, inv, col, offs, experts, rows, inter, per, block, e_block,
        num_warps=8 if block >= 2048 else 4)


if triton is not None:

    @triton_op("dsk::fp8_rows", mutates_args=())
    def _fp8_rows(x: torch.Tensor, col: torch.Tensor | None, offs: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.empty(x.shape, dtype=FP8, device=x.device)
        inv = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        launch_rows(wrap_triton, x, q, inv, col=col, offs=offs)
        return q, inv

    @triton_op("dsk::fp8_weight_rows", mutates_args=())
    def _fp8_weight_rows(a: torch.Tensor, b: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        n = a.size(1) + (0 if b is None else b.size(1))
        q = torch.empty(a.size(0), n, a.size(2), dtype=FP8, device=a.device)
        inv = torch.empty(a.size(0), n, dtype=torch.float32, device=a.device)
        launch_weight_rows(wrap_triton, a, b, q, inv)
        return q, inv

    @triton_op("dsk::fp8_transposed", mutates_args=())
    def _fp8_transposed(q: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(q.size(0), q.size(2), q.size(1))
        launch_transpose(wrap_triton, q, out)
        return out

    @triton_op("dsk::swiglu_fp8", mutates_args=())
    def _swiglu_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, inter = h.size(0), h.size(1) // 2
        out = h.new_empty(rows, inter)
        q = torch.empty(rows, inter, dtype=FP8, device=h.device)
        inv = torch.empty(rows, dtype=torch.float32, device=h.device)
        launch_swiglu(wrap_triton, h, out, q, inv)
        return out, q, inv

    @triton_op("dsk::swiglu_backward_fp8", mutates_args=())
    def _swiglu_backward_fp8(h: torch.Tensor, grad: torch.Tensor, col: torch.Tensor | None,
                             offs: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dh = torch.empty_like(h)
        q = torch.empty(h.shape, dtype=FP8, device=h.device)
        inv = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        launch_swiglu_backward(wrap_triton, h, grad, dh, q, inv, col, offs)
        return dh, q, inv

    @triton_op("dsk::moe_dispatch_fp8", mutates_args=())
    def _moe_dispatch_fp8(x: torch.Tensor, rank: torch.Tensor, topk: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, dim = x.shape
        out = x.new_empty(rank.numel(), dim)
        q = torch.empty(rank.numel(), dim, dtype=FP8, device=x.device)
        inv = torch.empty(rank.numel(), dtype=torch.float32, device=x.device)
        if tokens:
            rows, width = row_tile(dim)
            wrap_triton(_dispatch_fp8_kernel)[(triton.cdiv(tokens, rows),)](
                x, rank, out, q, inv, tokens, dim, topk, rows, width, num_warps=NUM_WARPS)
        return out, q, inv

    @triton_op("dsk::moe_combine_backward_fp8", mutates_args=())
    def _moe_combine_backward_fp8(grad: torch.Tensor, y_sorted: torch.Tensor,
                                  weights: torch.Tensor, rank: torch.Tensor, col: torch.Tensor,
                                  offs: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
        dim = y_sorted.size(1)
        tokens, topk = weights.shape
        grad_y = torch.empty_like(y_sorted)
        grad_w = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
        q = torch.empty(y_sorted.shape, dtype=FP8, device=y_sorted.device)
        inv = torch.empty(y_sorted.size(0), dtype=torch.float32, device=y_sorted.device)
        if tokens:
            rows, width = row_tile(dim)
            col, offs, experts, e_block = _expert_args(y_sorted, col, offs)
            wrap_triton(_combine_backward_fp8_kernel)[(triton.cdiv(tokens, rows),)](
                grad, y_sorted, weights, rank, grad_y, grad_w, q, inv, col, offs, experts,
                tokens, dim, topk, rows, width, e_block, num_warps=NUM_WARPS)
        return grad_y, grad_w.to(weights.dtype), q, inv


# ---- dispatch: the kernels on the GPU, the plain expressions elsewhere ----

def _contiguous(t):
    return None if t is None else t.contiguous()


def fp8_rows(x, col=None, offs=None):
    """``rows_reference``: a kernel on the GPU."""
    if kernels_run(x):
        return torch.ops.dsk.fp8_rows(x.contiguous(), _contiguous(col), _contiguous(offs))
    return rows_reference(x, col, offs)


def fp8_weight_rows(a, b=None):
    if kernels_run(a):
        return torch.ops.dsk.fp8_weight_rows(a.contiguous(), _contiguous(b))
    return weight_rows_reference(a, b)


def swiglu_fp8(h):
    return torch.ops.dsk.swiglu_fp8(h.contiguous()) if kernels_run(h) else swiglu_reference(h)


def swiglu_backward_fp8(h, grad, col=None, offs=None):
    if kernels_run(h):
        return torch.ops.dsk.swiglu_backward_fp8(h.contiguous(), grad.contiguous(),
                                                 _contiguous(col), _contiguous(offs))
    return swiglu_backward_reference(h, grad, col, offs)


def dispatch_fp8(x, topk, order, rank):
    """``dispatch_fp8_reference``: one kernel on the GPU."""
    if kernels_run(x):
        return torch.ops.dsk.moe_dispatch_fp8(x.contiguous(), rank, topk)
    return dispatch_fp8_reference(x, topk, order, rank)


def combine_backward_fp8(grad, y_sorted, weights, rank, col, offs):
    """``combine_backward_fp8_reference``: one kernel on the GPU."""
    if kernels_run(grad):
        return torch.ops.dsk.moe_combine_backward_fp8(
            grad.contiguous(), y_sorted, weights.contiguous(), rank, col.contiguous(),
            offs.contiguous())
    return combine_backward_fp8_reference(grad, y_sorted, weights, rank, col, offs)


def scaled_grouped_mm(a, b, a_inv, b_inv, offs):
    """a (M, K) @ b (E, K, N) per group, b column-major (a transposed view)."""
    if a.is_cuda:
        return torch._scaled_grouped_mm(a, b, a_inv, b_inv, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
    return scaled_grouped_mm_reference(a, b, a_inv, b_inv, offs)


@torch.library.custom_op("dsk::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a.contiguous().t(), b.contiguous(), offs=offs)


@_grouped_weight_grad.register_fake
def _grouped_weight_grad_fake(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor
                              ) -> torch.Tensor:
    return a.new_empty(offs.numel(), a.size(1), b.size(1))


def grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a_g^T b_g`` for each group g of rows (tokens) ending at ``offs``: a (M, X), b (M, Y)
    -> (E, X, Y), a weight gradient in its parameter's (E, out, in) layout.

    An opaque op, so that under torch.compile the grouped GEMM gets ``a^T`` with the
    tokens as its strided dimension, as in eager. Inlined, inductor may realise a fused
    ``a`` (the output gradient, gathered back into expert order) directly in the
    transposed, token-contiguous layout; the 2d-2d grouped GEMM then needs every group's
    token count to be a multiple of 8 and fails a device-side assertion otherwise."""
    return torch.ops.dsk.grouped_weight_grad(a, b, offs)


def column_major(q: torch.Tensor) -> torch.Tensor:
    """(E, N, K) e4m3 weights as the (K, N) operand b of ``a @ b`` per expert, which the
    scaled grouped GEMM takes column-major: a transposed copy (a kernel on the GPU:
    inductor's own transposing copy of these e4m3 tensors ran at a fifth of the
    bandwidth inside the compiled backward), viewed back."""
    if kernels_run(q):
        return torch.ops.dsk.fp8_transposed(q.contiguous()).transpose(-2, -1)
    return q.transpose(-2, -1).contiguous().transpose(-2, -1)


def _ones(q: torch.Tensor) -> torch.Tensor:
    """Unit scales (E, K) for the e4m3 weights q (E, N, K) read as the column-major operand
    (K columns), whose row scales are folded into the other operand."""
    return torch.ones(q.size(0), q.size(-1), dtype=torch.float32, device=q.device)


class Saved(NamedTuple):
    """What the experts' backward needs from their forward: the tokens, w1|w3's output,
    the SwiGLU's output (bf16), the e4m3 weights with their inverse row scales, and the
    groups' ends."""
    x: torch.Tensor
    h: torch.Tensor
    act: torch.Tensor
    w13q: torch.Tensor
    w13_inv: torch.Tensor
    w2q: torch.Tensor
    w2_inv: torch.Tensor
    offs: torch.Tensor


def experts_forward(x, xq, x_inv, w1, w2, w3, offs) -> tuple[torch.Tensor, Saved]:
    """The four FP8 GEMMs' forward half for tokens x (bf16), already in e4m3 (xq, x_inv):
    the output (bf16) and what the backward needs."""
    w13q, w13_inv = fp8_weight_rows(w1, w3)  # (E, 2I, D)
    h = scaled_grouped_mm(xq, w13q.transpose(-2, -1), x_inv, w13_inv, offs)
    act, aq, a_inv = swiglu_fp8(h)
    w2q, w2_inv = fp8_weight_rows(w2)  # (E, D, I)
    out = scaled_grouped_mm(aq, w2q.transpose(-2, -1), a_inv, w2_inv, offs)
    # the backward's input gradients reuse these e4m3 weights (not the masters)
    return out, Saved(x, h, act, w13q, w13_inv, w2q, w2_inv, offs)


def experts_backward(saved: Saved, grad, gq, g_inv, dtypes):
    """The input and weight gradients from the output gradient ``grad`` (bf16) and its
    e4m3 rows ``gq``, ``g_inv``, quantised with w2's inverse scales folded in (as
    ``fp8_rows(grad, saved.w2_inv, saved.offs)``): grad @ w2 per group = (grad * w2_inv[e]) @ w2q,
    the weight rows' scales running along the contraction, and w2q, transposed to the
    column-major operand, read unscaled. ``dtypes`` are w1's, w2's and w3's."""
    x, h, act, w13q, w13_inv, w2q, _w2_inv, offs = saved
    d_act = scaled_grouped_mm(gq, column_major(w2q), g_inv, _ones(w2q), offs)
    # the weight gradients come out of their GEMMs in the parameters' own layout,
    # (E, out, in) = grad^T act per group, so that handing them over is a plain cast
    # (no transposing copy)
    dw2 = grouped_weight_grad(grad, act, offs)  # (E, D, I)
    dh, dhq, dh_inv = swiglu_backward_fp8(h, d_act, w13_inv, offs)
    dx = scaled_grouped_mm(dhq, column_major(w13q), dh_inv, _ones(w13q), offs)
    dw13 = grouped_weight_grad(dh, x, offs)  # (E, 2I, D): [w1 | w3]'s
    inter = dw13.size(1) // 2
    w1_dtype, w2_dtype, w3_dtype = dtypes

    def as_param(g, dtype):  # the weight's dtype, contiguous (w1's and w3's halves
        return g.to(dtype, memory_format=torch.contiguous_format)  # are strided)

    return (dx.to(x.dtype), as_param(dw13[:, :inter], w1_dtype), as_param(dw2, w2_dtype),
            as_param(dw13[:, inter:], w3_dtype))


class Fp8ExpertsFunction(torch.autograd.Function):
    """The routed experts' SwiGLU MLP, ``(silu(x w1^T) * (x w3^T)) w2^T`` per expert group,
    with the four activation-side GEMMs in FP8 and the weight gradients in bf16. x is bf16
    (M, D), sorted by expert, the groups ending at ``offs`` (int32); w1, w3 (E, I, D) and
    w2 (E, D, I) in their master dtype; the output is bf16 (M, D)."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, offs):
        out, saved = experts_forward(x, *fp8_rows(x), w1, w2, w3, offs)
        ctx.save_for_backward(*saved)
        ctx.weights = (w1.dtype, w2.dtype, w3.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = Saved(*ctx.saved_tensors)
        grad = grad.to(torch.bfloat16).contiguous()
        gq, g_inv = fp8_rows(grad, saved.w2_inv, saved.offs)
        return (*experts_backward(saved, grad, gq, g_inv, ctx.weights), None)


class Fp8MoEFunction(torch.autograd.Function):
    """The MoE's whole routed path with the FP8 experts: dispatch, ``Fp8ExpertsFunction``'s
    experts and combine, with the two activation casts that read the moved rows fused into
    the moves: the tokens are quantised in the dispatch's kernel, once per token (its
    topk rows are copies), and the output gradient's rows in the combine's backward
    kernel, as it writes them. The arithmetic is the unfused path's. x (T, D) bf16;
    weights (T, topk) the gate's; ``order`` groups the slots by expert, ``rank`` is its
    inverse; the groups of expert rows end at ``offs`` (int32)."""

    @staticmethod
    def forward(ctx, x, weights, order, rank, offs, w1, w2, w3):
        topk = weights.size(-1)
        routed, xq, x_inv = dispatch_fp8(x, topk, order, rank)
        y_sorted, saved = experts_forward(routed, xq, x_inv, w1, w2, w3, offs)
        y = combine(y_sorted, weights, order, rank)  # no autograd inside forward
        ctx.save_for_backward(y_sorted, weights, rank, *saved)
        ctx.weights = (w1.dtype, w2.dtype, w3.dtype)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        y_sorted, weights, rank, *rest = ctx.saved_tensors
        saved = Saved(*rest)
        grad_y, grad_w, gq, g_inv = combine_backward_fp8(
            grad.to(y_sorted.dtype), y_sorted, weights, rank, saved.w2_inv, saved.offs)
        dx, dw1, dw2, dw3 = experts_backward(saved, grad_y, gq, g_inv, ctx.weights)
        dx = dispatch_backward(dx, rank, weights.size(-1)).to(ctx.x_dtype)
        return dx, grad_w, None, None, None, dw1, dw2, dw3


class Fp8GroupedExperts(GroupedExperts):
    """GroupedExperts whose grouped GEMMs run through ``Fp8ExpertsFunction``: the same
    parameters, state dict and CPU path (the per-expert loop, in full precision). On the
    GPU the MoE's routed path is ``Fp8MoEFunction`` (the casts fused into the token
    moves), unless expert parallelism runs between the moves and the experts."""

    def route(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
              rank: torch.Tensor, counts: torch.Tensor, topk: int) -> torch.Tensor:
        if not (self.fuse_moves and self.grouped(x)):
            return super().route(x, weights, order, rank, counts, topk)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return Fp8MoEFunction.apply(x.to(torch.bfloat16), weights, order, rank, offsets,
                                    self.w1, self.w2, self.w3).to(x.dtype)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return Fp8ExpertsFunction.apply(x.to(torch.bfloat16), self.w1, self.w2, self.w3,
                                        offsets)


def supported(module: GroupedExperts) -> bool:
    """Whether the FP8 grouped GEMM takes this module's widths (multiples of 16)."""
    return all(s % ALIGN == 0 for s in module.w1.shape[1:] + module.w2.shape[1:])
