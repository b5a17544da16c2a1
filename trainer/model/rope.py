"""MLA's rotary positions (each position's rotations, precomputed, and the rotation
itself) and the attention inputs built from them: the queries (each head's nope part,
then its rope part rotated), the keys (each head's nope part from the latent, then the
one rotated rope key all heads share) and the values.

On the GPU the forward is one Triton kernel and so is the backward. The compiled torch
expression ran its forward at about half the memory bandwidth (one kernel writing the
queries and keys through a cat of pairs) and its backward as three kernels: the queries'
gradient, the keys' and values' gradients assembled into the latent's, and the rope key's
gradient summed over heads (docs/benchmarks.md). Here the forward reads each input once
and writes the three outputs contiguous; the backward reads the three gradients once and
writes the queries' gradient, the latent's (keys' nope part and values side by side, the
layout ``wkv_b``'s output has) and the rope key's, summed over heads in fp32.

Registered as custom ops (torch.library.triton_op) so that torch.compile keeps them in its
graph. On the CPU, where Triton is missing, or for shapes the kernels do not take (a rope
width that is not a power of two, inputs of different dtypes), ``mla_qkv`` is the plain
expression, which is also what the kernels are tested against.
"""

from __future__ import annotations

import math

import torch

from trainer.kernels import kernels_run, tl, triton, triton_op, wrap_triton
from trainer.model.args import ModelArgs

# elements of the widest (tokens, heads, width) tile a program moves, and its warps
TILE = 4096
NUM_WARPS = 4


def precompute_rope(args: ModelArgs) -> torch.Tensor:
    """Rotations by pos * theta^(-2j/d) as (cos, sin) pairs, shape (max_seq_len, head_dim // 2,
    2), fp32. Real-valued, so that torch.compile fuses the rotation into its neighbours
    (inductor generates no code for complex tensors).

    With YaRN (``args.yarn``: max_seq_len > original_seq_len), the frequencies whose
    wavelength is long against original_seq_len are divided by rope_factor, the short
    ones kept, and those between blended by a linear ramp over the dimensions between the
    ones that turn beta_fast and beta_slow times in original_seq_len, as DeepSeek-V3's
    reference model computes them."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.yarn:
        def correction_dim(rotations: float) -> float:
            return (dim * math.log(args.original_seq_len / (rotations * 2 * math.pi))
                    / (2 * math.log(base)))

        low = max(math.floor(correction_dim(args.beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by position; the pairs (x[2j], x[2j+1]) are
    rotated as complex numbers x[2j] + i x[2j+1] (DeepSeek's layout), computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    rot = freqs_cis.view(1, xf.size(1), 1, xf.size(-2), 2)
    cos, sin = rot[..., 0], rot[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(3).to(x.dtype)


def reference(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
              freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain expression of ``mla_qkv`` (CPU, and what the kernels are tested
    against); the values are a view of ``kv`` here."""
    rope = k_pe.size(-1)
    nope = q.size(-1) - rope
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    q = torch.cat([q_nope, apply_rope(q_pe, freqs_cis)], dim=-1)
    k_nope, v = kv.split([nope, kv.size(-1) - nope], dim=-1)
    k_pe = apply_rope(k_pe.unsqueeze(2), freqs_cis)  # one rope key shared by all heads
    k = torch.cat([k_nope, k_pe.expand(-1, -1, kv.size(2), -1)], dim=-1)
    return q, k, v


if triton is not None:

    @triton.jit
    def _program_tokens(f_ptr, n_tokens, seqlen, rope: tl.constexpr, tokens: tl.constexpr):
        """This program's tokens: their index t, whether they exist (tokens, 1), their
        batch row and position, and the cos and sin of their position, (tokens, rope //
        2) each."""
        t = tl.program_id(0).to(tl.int64) * tokens + tl.arange(0, tokens)
        t_ok = (t < n_tokens)[:, None]
        b, s = t // seqlen, t % seqlen
        f = tl.load(f_ptr + s[:, None] * rope + tl.arange(0, rope)[None, :], mask=t_ok)
        cos, sin = tl.split(tl.reshape(f, (tokens, rope // 2, 2)))
        return t, t_ok, b, s, cos, sin

    @triton.jit
    def _head_block(h0, heads, t_ok, nope: tl.constexpr, vdim: tl.constexpr,
                    nope_block: tl.constexpr, v_block: tl.constexpr,
                    heads_block: tl.constexpr):
        """The heads h0.. of this pass as (1, heads_block, 1), the masks of the
        (tokens, heads_block, width) tiles that exist (any width, the nope part's, the
        values'), and the nope part's and the values' columns as (1, 1, width)."""
        h = h0 + tl.arange(0, heads_block)
        at = t_ok[:, :, None] & (h < heads)[None, :, None]
        n3 = tl.arange(0, nope_block)[None, None, :]
        v3 = tl.arange(0, v_block)[None, None, :]
        return h[None, :, None], at, at & (n3 < nope), at & (v3 < vdim), n3, v3

    @triton.jit
    def _qkv_forward_kernel(
            q_ptr, kv_ptr, pe_ptr, f_ptr, qo_ptr, ko_ptr, vo_ptr, n_tokens, seqlen, heads,
            q_sb, q_ss, q_sh, kv_sb, kv_ss, kv_sh, pe_sb, pe_ss,
            nope: tl.constexpr, rope: tl.constexpr, vdim: tl.constexpr,
            nope_block: tl.constexpr, v_block: tl.constexpr, heads_block: tl.constexpr,
            tokens: tl.constexpr):
        t, t_ok, b, s, cos, sin = _program_tokens(f_ptr, n_tokens, seqlen, rope, tokens)
        cos3, sin3 = cos[:, None, :], sin[:, None, :]
        r = tl.arange(0, rope)
        r3 = r[None, None, :]
        # the one rope key of each token, rotated once for all heads
        p = tl.load(pe_ptr + (b * pe_sb + s * pe_ss)[:, None] + r[None, :], mask=t_ok)
        p1, p2 = tl.split(tl.reshape(p.to(tl.float32), (tokens, rope // 2, 2)))
        k_rot = tl.reshape(tl.join(p1 * cos - p2 * sin, p1 * sin + p2 * cos), (tokens, rope))
        k_rot = k_rot[:, None, :] + tl.zeros((tokens, heads_block, rope), tl.float32)
        q_row, kv_row = b * q_sb + s * q_ss, b * kv_sb + s * kv_ss
        for h0 in range(0, heads, heads_block):
            head, at, n_ok, v_ok, n3, v3 = _head_block(h0, heads, t_ok, nope, vdim, nope_block,
                                                       v_block, heads_block)
            q_in = q_row[:, None, None] + head * q_sh
            kv_in = kv_row[:, None, None] + head * kv_sh
            # the outputs are contiguous (batch, seq, heads, width)
            out = (t * heads * (nope + rope))[:, None, None] + head * (nope + rope)

            tl.store(qo_ptr + out + n3, tl.load(q_ptr + q_in + n3, mask=n_ok), mask=n_ok)
            x = tl.load(q_ptr + q_in + nope + r3, mask=at).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (tokens, heads_block, rope // 2, 2)))
            rot = tl.reshape(tl.join(x1 * cos3 - x2 * sin3, x1 * sin3 + x2 * cos3),
                             (tokens, heads_block, rope))
            tl.store(qo_ptr + out + nope + r3, rot.to(qo_ptr.dtype.element_ty), mask=at)

            tl.store(ko_ptr + out + n3, tl.load(kv_ptr + kv_in + n3, mask=n_ok), mask=n_ok)
            tl.store(ko_ptr + out + nope + r3, k_rot.to(ko_ptr.dtype.element_ty), mask=at)
            tl.store(vo_ptr + (t * heads * vdim)[:, None, None] + head * vdim + v3,
                     tl.load(kv_ptr + kv_in + nope + v3, mask=v_ok), mask=v_ok)

    @triton.jit
    def _qkv_backward_kernel(
            dq_ptr, dk_ptr, dv_ptr, f_ptr, dqi_ptr, dkv_ptr, dpe_ptr, n_tokens, seqlen,
            heads, dq_sb, dq_ss, dq_sh, dk_sb, dk_ss, dk_sh, dv_sb, dv_ss, dv_sh,
            nope: tl.constexpr, rope: tl.constexpr, vdim: tl.constexpr,
            nope_block: tl.constexpr, v_block: tl.constexpr, heads_block: tl.constexpr,
            tokens: tl.constexpr):
        t, t_ok, b, s, cos, sin = _program_tokens(f_ptr, n_tokens, seqlen, rope, tokens)
        cos3, sin3 = cos[:, None, :], sin[:, None, :]
        r = tl.arange(0, rope)
        r3 = r[None, None, :]
        dq_row, dk_row = b * dq_sb + s * dq_ss, b * dk_sb + s * dk_ss
        dv_row = b * dv_sb + s * dv_ss
        pe_sum = tl.zeros((tokens, rope), tl.float32)
        for h0 in range(0, heads, heads_block):
            head, at, n_ok, v_ok, n3, v3 = _head_block(h0, heads, t_ok, nope, vdim, nope_block,
                                                       v_block, heads_block)

            # the queries' gradient: the nope part as it is, the rope part rotated back;
            # written contiguous (batch, seq, heads, width), as the projection's output is
            dq_in = dq_row[:, None, None] + head * dq_sh
            q_out = (t * heads * (nope + rope))[:, None, None] + head * (nope + rope)
            tl.store(dqi_ptr + q_out + n3, tl.load(dq_ptr + dq_in + n3, mask=n_ok), mask=n_ok)
            g = tl.load(dq_ptr + dq_in + nope + r3, mask=at).to(tl.float32)
            g1, g2 = tl.split(tl.reshape(g, (tokens, heads_block, rope // 2, 2)))
            back = tl.reshape(tl.join(g1 * cos3 + g2 * sin3, g2 * cos3 - g1 * sin3),
                              (tokens, heads_block, rope))
            tl.store(dqi_ptr + q_out + nope + r3, back.to(dqi_ptr.dtype.element_ty), mask=at)

            # the latent's gradient: each head's keys' nope part, then its values'
            dk_in = dk_row[:, None, None] + head * dk_sh
            kv_out = (t * heads * (nope + vdim))[:, None, None] + head * (nope + vdim)
            tl.store(dkv_ptr + kv_out + n3, tl.load(dk_ptr + dk_in + n3, mask=n_ok),
                     mask=n_ok)
            tl.store(dkv_ptr + kv_out + nope + v3,
                     tl.load(dv_ptr + dv_row[:, None, None] + head * dv_sh + v3, mask=v_ok),
                     mask=v_ok)
            pe_sum += tl.sum(tl.load(dk_ptr + dk_in + nope + r3, mask=at, other=0.0)
                             .to(tl.float32), axis=1)

        # the shared rope key's gradient: the heads' summed in fp32, rotated back
        g1, g2 = tl.split(tl.reshape(pe_sum, (tokens, rope // 2, 2)))
        back = tl.reshape(tl.join(g1 * cos + g2 * sin, g2 * cos - g1 * sin), (tokens, rope))
        tl.store(dpe_ptr + t[:, None] * rope + r[None, :], back.to(dpe_ptr.dtype.element_ty),
                 mask=t_ok)

    def _blocks(heads: int, nope: int, rope: int, vdim: int) -> dict:
        """The kernels' block sizes: each width padded to a power of two, as many heads
        at a time as fit a tile of TILE elements (a loop takes the rest), and as many
        tokens as keep that tile within TILE."""
        nope_block, v_block = triton.next_power_of_2(nope), triton.next_power_of_2(vdim)
        width = max(nope_block, v_block, rope)
        heads_block = min(triton.next_power_of_2(heads), max(1, TILE // width))
        return dict(nope=nope, rope=rope, vdim=vdim, nope_block=nope_block, v_block=v_block,
                    heads_block=heads_block, tokens=max(1, TILE // (heads_block * width)))

    def _unit_last(x: torch.Tensor) -> torch.Tensor:
        return x if x.stride(-1) == 1 else x.contiguous()

    @triton_op("dsk::mla_qkv", mutates_args=())
    def _mla_qkv(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                 freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, kv, k_pe = _unit_last(q), _unit_last(kv), _unit_last(k_pe)
        bsz, seqlen = q.shape[:2]
        # the widths and heads set the kernel's blocks: plain ints, even where
        # torch.compile traces the batch and sequence as symbols
        heads, rope = int(q.size(2)), int(k_pe.size(-1))
        nope = int(q.size(-1)) - rope
        vdim = int(kv.size(-1)) - nope
        q_out = torch.empty(bsz, seqlen, heads, nope + rope, dtype=q.dtype, device=q.device)
        k_out = torch.empty_like(q_out, dtype=kv.dtype)
        v_out = torch.empty(bsz, seqlen, heads, vdim, dtype=kv.dtype, device=kv.device)
        blocks = _blocks(heads, nope, rope, vdim)
        n_tokens = bsz * seqlen
        wrap_triton(_qkv_forward_kernel)[(triton.cdiv(n_tokens, blocks["tokens"]),)](
            q, kv, k_pe, freqs_cis.contiguous(), q_out, k_out, v_out, n_tokens, seqlen, heads,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), kv.stride(2),
            k_pe.stride(0), k_pe.stride(1), **blocks, num_warps=NUM_WARPS)
        return q_out, k_out, v_out

    @triton_op("dsk::mla_qkv_backward", mutates_args=())
    def _mla_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                          freqs_cis: torch.Tensor, rope: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = _unit_last(dq), _unit_last(dk), _unit_last(dv)
        bsz, seqlen = dq.shape[:2]
        heads, width, vdim = int(dq.size(2)), int(dq.size(-1)), int(dv.size(-1))
        nope = width - rope
        dqi = torch.empty(bsz, seqlen, heads, width, dtype=dq.dtype, device=dq.device)
        dkv = torch.empty(bsz, seqlen, heads, nope + vdim, dtype=dk.dtype, device=dk.device)
        dpe = torch.empty(bsz, seqlen, rope, dtype=dk.dtype, device=dk.device)
        blocks = _blocks(heads, nope, rope, vdim)
        n_tokens = bsz * seqlen
        wrap_triton(_qkv_backward_kernel)[(triton.cdiv(n_tokens, blocks["tokens"]),)](
            dq, dk, dv, freqs_cis.contiguous(), dqi, dkv, dpe, n_tokens, seqlen, heads,
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1),
            dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), **blocks,
            num_warps=NUM_WARPS)
        return dqi, dkv, dpe

    def _setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[3])
        ctx.rope = inputs[2].size(-1)
        ctx.like = [(x.shape, x.dtype) for x in output]

    def _backward(ctx, dq, dk, dv):
        (freqs_cis,) = ctx.saved_tensors
        dq, dk, dv = (g if g is not None else torch.zeros(shape, dtype=dtype,
                                                          device=freqs_cis.device)
                      for g, (shape, dtype) in zip((dq, dk, dv), ctx.like, strict=True))
        dqi, dkv, dpe = torch.ops.dsk.mla_qkv_backward(dq, dk, dv, freqs_cis, ctx.rope)
        return dqi, dkv, dpe, None

    _mla_qkv.register_autograd(_backward, setup_context=_setup)


def mla_qkv(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, freqs_cis: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's queries, keys and values, each (batch, seq, heads, width), from ``q`` (batch,
    seq, heads, nope + rope) before rotation, the latent's up-projection ``kv`` (batch,
    seq, heads, nope + v), the rope key ``k_pe`` (batch, seq, rope) before rotation and
    ``freqs_cis`` (seq, rope // 2, 2). The kernels on the GPU, the plain expression
    elsewhere."""
    rope = k_pe.size(-1)
    if (not kernels_run(q, kv, k_pe, freqs_cis) or q.dim() != 4 or kv.dim() != 4
            or rope < 2 or rope & (rope - 1) or not q.dtype == kv.dtype == k_pe.dtype
            or freqs_cis.dtype != torch.float32
            or tuple(freqs_cis.shape) != (q.size(1), rope // 2, 2)):
        return reference(q, kv, k_pe, freqs_cis)
    return torch.ops.dsk.mla_qkv(q, kv, k_pe, freqs_cis)
