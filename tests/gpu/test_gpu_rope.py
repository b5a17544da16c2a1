"""MLA's attention-input kernels (trainer/model/rope.py) against the plain expression
computed in fp32: queries, keys and values and the three inputs' gradients, eager and
compiled, at the configs' widths and at widths, head counts and token counts that fill
no block; the rope key a strided slice of the latent's projection as in the model; an
output left out of the loss; and the attention layer through them. Skipped without CUDA
(conftest) or without Triton."""

from __future__ import annotations

import pytest
import torch

from trainer.model import rope

pytestmark = pytest.mark.skipif(rope.triton is None, reason="Triton is not installed")

LATENT = 24  # width of the latent beside the rope key in the projection they share


def _inputs(bsz, seq, heads, nope, rp, vd, dtype):
    torch.manual_seed(0)
    q = torch.randn(bsz, seq, heads, nope + rp, device="cuda").to(dtype)
    kv = torch.randn(bsz, seq, heads, nope + vd, device="cuda").to(dtype)
    latent = torch.randn(bsz, seq, LATENT + rp, device="cuda").to(dtype)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device="cuda"),
                         torch.rand(rp // 2, device="cuda"))
    return q, kv, latent, torch.stack([angles.cos(), angles.sin()], dim=-1)


def _run(fn, q, kv, latent, freqs, grads, dtype):
    leaves = [x.to(dtype).detach().requires_grad_() for x in (q, kv, latent)]
    outs = fn(leaves[0], leaves[1], leaves[2][..., LATENT:], freqs)
    torch.autograd.backward([o for o, g in zip(outs, grads, strict=True) if g is not None],
                            [g.to(dtype) for g in grads if g is not None])
    return [o.detach() for o in outs], [x.grad for x in leaves]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("bsz", "seq", "heads", "nope", "rp", "vd", "dtype"), [
    (2, 4096, 16, 64, 32, 64, torch.bfloat16),    # small.toml
    (1, 4096, 16, 128, 64, 128, torch.bfloat16),  # wide.toml
    (3, 37, 6, 48, 16, 40, torch.bfloat16),       # no width, head or token count fills a block
    (1, 19, 128, 128, 64, 128, torch.float32),    # 671b.toml's heads
])
def test_kernels_match_the_expression(bsz, seq, heads, nope, rp, vd, dtype, compiled):
    q, kv, latent, freqs = _inputs(bsz, seq, heads, nope, rp, vd, dtype)
    # the gradients as the kernels get them (rounded to dtype), in fp32 for the expression
    grads = [torch.randn(bsz, seq, heads, w, device="cuda").to(dtype).float()
             for w in (nope + rp, nope + rp, vd)]
    torch._dynamo.reset()  # each case compiled for its own shapes, as the trainer's blocks are
    fn = torch.compile(rope.mla_qkv) if compiled else rope.mla_qkv
    outs, in_grads = _run(fn, q, kv, latent, freqs, grads, dtype)
    exact_outs, exact_grads = _run(rope.reference, q, kv, latent, freqs, grads, torch.float32)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for got, want in zip(outs + in_grads, exact_outs + exact_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, **tol)
    assert all(o.is_contiguous() for o in outs)


def test_an_output_left_out_of_the_loss_gives_no_gradient_from_it():
    q, kv, latent, freqs = _inputs(2, 33, 4, 16, 8, 16, torch.float32)
    grads = [torch.randn(2, 33, 4, 24, device="cuda"), None, None]  # the queries only
    _, (dq, dkv, dlatent) = _run(rope.mla_qkv, q, kv, latent, freqs, grads, torch.float32)
    _, (want_dq, _, _) = _run(rope.reference, q, kv, latent, freqs, grads, torch.float32)
    torch.testing.assert_close(dq, want_dq, atol=1e-5, rtol=1e-5)
    assert dkv is not None and not dkv.any() and not dlatent.any()


def test_the_attention_layer_through_the_kernels_equals_it_through_the_expression(monkeypatch):
    from trainer.model import model as mm
    from trainer.model.args import ModelArgs

    args = ModelArgs(dim=256, n_heads=4, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, kv_lora_rank=64, max_seq_len=128)
    torch.manual_seed(0)
    layer = mm.MLA(args).cuda()
    x = torch.randn(2, 128, args.dim, device="cuda")
    freqs = mm.precompute_rope(args).cuda()

    def run():
        xi = x.clone().requires_grad_()
        out = layer(xi, freqs)
        out.square().mean().backward()
        grads = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return out.detach(), grads

    out, grads = run()
    monkeypatch.setattr(mm, "mla_qkv", rope.reference)
    want, want_grads = run()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, exp in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)
