"""The MoE's dispatch and combine kernels (trainer/model/permute.py) against the plain
gathers: outputs and the gradients of the tokens, the experts' rows and the gate's
weights, eager and compiled, with row widths that do not fill a tile and token counts
that do not fill the last program. Skipped without CUDA (conftest) or without Triton."""

from __future__ import annotations

import pytest
import torch

from trainer.model import permute as pm

pytestmark = pytest.mark.skipif(pm.triton is None, reason="Triton is not installed")


def _moves(dispatch, combine, x, y_sorted, weights, order, rank, topk):
    out_d = dispatch(x, topk, order, rank)
    out_c = combine(y_sorted, weights, order, rank)
    return out_d, out_c


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("tokens", "topk", "experts", "dim", "dtype"), [
    (8192, 6, 48, 1024, torch.bfloat16), (1001, 6, 64, 2048, torch.bfloat16),
    (333, 2, 8, 100, torch.float32)])
def test_kernels_match_the_gathers(tokens, topk, experts, dim, dtype, compiled):
    torch.manual_seed(0)
    scores = torch.rand(tokens, experts, device="cuda")
    w, indices = scores.topk(topk, dim=-1)
    _, order, rank = pm.sort_slots(indices)
    x = torch.randn(tokens, dim, device="cuda").to(dtype)
    y_sorted = torch.randn(tokens * topk, dim, device="cuda").to(dtype)
    gx = torch.randn(tokens * topk, dim, device="cuda").to(dtype)
    gy = torch.randn(tokens, dim, device="cuda").to(dtype)
    results = []
    for dispatch, combine in ((pm.dispatch, pm.combine),
                              (pm.dispatch_reference, pm.combine_reference)):
        leaves = [t.clone().requires_grad_() for t in (x, y_sorted, w)]
        fn = torch.compile(_moves) if compiled else _moves
        outs = fn(dispatch, combine, *leaves, order, rank, topk)
        torch.autograd.backward(outs, (gx, gy))
        results.append([o.detach() for o in outs] + [t.grad for t in leaves])
    (d, c, dx, dy, dw), (d_ref, c_ref, dx_ref, dy_ref, dw_ref) = results
    assert torch.equal(d, d_ref)  # rows copied, not computed
    for mine, ref in ((c, c_ref), (dx, dx_ref), (dy, dy_ref)):
        assert mine.dtype == ref.dtype == dtype
        # the kernels sum in fp32 what the plain form rounds to bf16 product by product:
        # where a sum cancels, the two differ by the rounding of its terms
        scale = ref.abs().max().item()
        tol = (dict(atol=1e-2 * scale, rtol=2e-2) if dtype == torch.bfloat16
               else dict(atol=1e-6 * scale, rtol=1e-5))
        torch.testing.assert_close(mine, ref, **tol)
    # the weights' gradient: the kernel sums in fp32, the plain form in the rows' dtype
    assert dw.dtype == dw_ref.dtype == torch.float32
    torch.testing.assert_close(dw, dw_ref, atol=0.05 * dw_ref.abs().max().item(), rtol=0.05)


def test_the_model_moves_its_rows_with_the_kernels():
    """On the GPU the MoE layer's forward and backward run the four ops."""
    from torch.profiler import ProfilerActivity, profile

    from trainer.model import ModelArgs
    from trainer.model.model import MoE

    torch.manual_seed(0)
    moe = MoE(ModelArgs(dim=128, moe_inter_dim=64, n_routed_experts=8,
                        n_activated_experts=2)).cuda()
    x = torch.randn(2, 64, 128, device="cuda", requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        moe(x).sum().backward()
    names = {e.name for e in prof.events()}
    for op in ("dsk::moe_dispatch", "dsk::moe_dispatch_backward", "dsk::moe_combine",
               "dsk::moe_combine_backward"):
        assert op in names, op
