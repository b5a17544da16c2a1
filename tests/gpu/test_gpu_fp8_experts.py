"""The routed experts in FP8 (trainer/model/fp8_experts.py) on a GPU: each Triton kernel
against its plain expression, and Fp8ExpertsFunction through torch's FP8 grouped GEMM
against the same arithmetic emulated on the CPU and against the bf16 experts, eager and
compiled, on token groups of any size (none a multiple of 16, some empty).
Skipped, saying why, without CUDA (conftest), without Triton, or on a GPU that torch's
FP8 grouped GEMM does not run on (compute capability other than 9.0 and 10.0)."""

from __future__ import annotations

import pytest
import torch

from trainer.model import fp8_experts as f8
from trainer.model.model import GroupedExperts

pytestmark = pytest.mark.skipif(f8.triton is None, reason="Triton is not installed")

STEP = 2.0 ** -3  # neighbouring e4m3 values differ by at most 1/8 of the larger


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def same_fp8(got, want, exact: bool):
    """The kernel's (e4m3 values, inverse scales) against the expression's: equal, or
    (where the two compute the values to cast with different rounding: the SwiGLU's
    sigmoid) a handful of values one e4m3 step apart, and the scales equal but for a row
    whose amax sits on a power of two."""
    (q, inv), (rq, rinv) = got, want
    assert q.dtype == rq.dtype == torch.float8_e4m3fn and q.shape == rq.shape
    assert inv.shape == rinv.shape
    if exact:
        assert torch.equal(inv, rinv)
        assert torch.equal(q.float(), rq.float()), int((q.float() != rq.float()).sum())
        return
    assert (inv == rinv).float().mean() > 0.999
    g, w = q.float() * inv.unsqueeze(-1), rq.float() * rinv.unsqueeze(-1)
    assert (g != w).float().mean() < 1e-3, float((g != w).float().mean())
    assert ((g - w).abs() <= STEP * w.abs() + 2.0 ** -9 * rinv.unsqueeze(-1)).all()


@pytest.mark.parametrize(("rows", "cols"), [(4455, 2048), (1000, 2816), (37, 100)])
def test_rows_kernel(rows, cols):
    torch.manual_seed(0)
    x = (torch.randn(rows, cols, device="cuda") * 3).to(torch.bfloat16)
    x[1] = 0
    same_fp8(f8.fp8_rows(x), f8.rows_reference(x), exact=True)


@pytest.mark.parametrize(("rows", "cols", "counts"),
                         [(4455, 2048, [700, 0, 2000, 1755]), (37, 100, [0, 30, 7])])
def test_rows_kernel_with_each_experts_column_scales(rows, cols, counts):
    """The input gradients' operands: each row times its expert's row of the weights'
    inverse scales, then quantised."""
    torch.manual_seed(0)
    x = (torch.randn(rows, cols, device="cuda") * 3).to(torch.bfloat16)
    col = f8.pow2_scale_reference(torch.rand(len(counts), cols, device="cuda") * 100)
    offs = torch.cumsum(torch.tensor(counts, device="cuda"), 0, dtype=torch.int32)
    same_fp8(f8.fp8_rows(x, col.reciprocal(), offs),
             f8.rows_reference(x, col.reciprocal(), offs), exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("experts", "n", "k"), [(64, 1408, 2048), (8, 100, 70)])
def test_weight_kernel(experts, n, k, dtype):
    torch.manual_seed(0)
    w1 = torch.randn(experts, n, k, device="cuda").to(dtype)
    w3 = (torch.randn(experts, n, k, device="cuda") * 7).to(dtype)
    w2 = torch.randn(experts, k, n, device="cuda").to(dtype)
    for got, want in ((f8.fp8_weight_rows(w1, w3), f8.weight_rows_reference(w1, w3)),
                      (f8.fp8_weight_rows(w2), f8.weight_rows_reference(w2))):
        same_fp8(got, want, exact=True)


@pytest.mark.parametrize("shape", [(64, 2816, 2048), (3, 200, 130), (2, 5, 7)])
def test_transposed_copy_of_the_weights(shape):
    """The input gradients' column-major operand: the e4m3 weights' bytes, transposed."""
    q = torch.randn(*shape, device="cuda").to(f8.FP8)
    out = f8.column_major(q)
    assert out.shape == q.shape and out.stride() == (shape[1] * shape[2], 1, shape[1])
    assert torch.equal(out.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize(("rows", "inter"), [(4455, 1408), (1000, 512), (37, 100)])
def test_swiglu_kernels(rows, inter):
    torch.manual_seed(0)
    h = (torch.randn(rows, 2 * inter, device="cuda") * 3).to(torch.bfloat16)
    g = torch.randn(rows, inter, device="cuda").to(torch.bfloat16)
    out, *fp8 = f8.swiglu_fp8(h)
    r_out, *r_fp8 = f8.swiglu_reference(h)
    torch.testing.assert_close(out, r_out, atol=1e-2, rtol=1e-2)
    same_fp8(fp8, r_fp8, exact=False)
    counts = [rows // 3, 0, rows - rows // 3]
    offs = torch.cumsum(torch.tensor(counts, device="cuda"), 0, dtype=torch.int32)
    col = f8.pow2_scale_reference(torch.rand(3, 2 * inter, device="cuda") * 100).reciprocal()
    for c, o in ((None, None), (col, offs)):
        dh, *d_fp8 = f8.swiglu_backward_fp8(h, g, c, o)
        r_dh, *r_d_fp8 = f8.swiglu_backward_reference(h, g, c, o)
        torch.testing.assert_close(dh, r_dh, atol=1e-2, rtol=1e-2)
        same_fp8(d_fp8, r_d_fp8, exact=False)


COUNTS = [40, 0, 17, 64, 3, 0, 100, 33]


def _experts():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 128).cuda()
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.05)
    return experts


def _run(experts, fn, x, counts):
    for t in (x, *experts.parameters()):
        t.grad = None
    out = fn(x, counts)
    out.float().square().sum().backward()
    return [out.detach().float(), *(t.grad.clone() for t in (x, *experts.parameters()))]


def test_function_matches_its_cpu_emulation_and_the_bf16_experts(fp8_grouped_gpu):
    experts = _experts()
    counts = torch.tensor(COUNTS, device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda").to(torch.bfloat16)
    x.requires_grad_()

    def bf16(x, counts):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return experts(x, counts)

    want = _run(experts, bf16, x, counts)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    got = _run(experts, lambda x, c: f8.Fp8ExpertsFunction.apply(
        x, experts.w1, experts.w2, experts.w3, offs), x, counts)
    cpu = experts.cpu()
    xc = x.detach().cpu().requires_grad_()
    emulated = _run(cpu, lambda x, c: f8.Fp8ExpertsFunction.apply(
        x, cpu.w1, cpu.w2, cpu.w3, offs.cpu()), xc, counts.cpu())
    for name, g, e, w in zip(("out", "x", "w1", "w2", "w3"), got, emulated, want,
                             strict=True):
        assert torch.isfinite(g).all(), name
        assert rel(g.cpu(), e) < 0.03, (name, rel(g.cpu(), e))
        assert rel(g, w) < 0.1, (name, rel(g, w))
    for e in (1, 5):  # experts that saw no token
        assert got[3][e].abs().max() == 0 and got[4][e].abs().max() == 0


def test_compiled_module_matches_eager(fp8_grouped_gpu):
    experts = _experts()
    experts.__class__ = f8.Fp8GroupedExperts
    counts = torch.tensor(COUNTS, device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda").to(torch.bfloat16)
    x.requires_grad_()
    eager = _run(experts, experts, x, counts)
    compiled = _run(experts, torch.compile(experts), x, counts)
    for name, a, b in zip(("out", "x", "w1", "w2", "w3"), compiled, eager, strict=True):
        assert rel(a, b) < 0.02, (name, rel(a, b))


# ---- the casts fused into the MoE's token moves (Fp8MoEFunction) ----

def _routing(tokens, experts, topk, seed=0):
    """A routing of ``tokens`` tokens to ``topk`` of ``experts`` experts each: the gate's
    weights, order, rank and each expert's count (trainer.model.permute)."""
    from trainer.model.permute import sort_slots

    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(tokens, experts, device="cuda", generator=gen)
    weights, indices = scores.topk(topk, dim=-1)
    by_expert, order, rank = sort_slots(indices)
    counts = torch.searchsorted(by_expert, torch.arange(experts + 1, device="cuda")).diff()
    return weights, order, rank, counts


@pytest.mark.parametrize(("tokens", "dim", "topk"), [(8192, 2048, 6), (37, 100, 2)])
def test_dispatch_kernel_with_the_tokens_fp8_copy(tokens, dim, topk):
    torch.manual_seed(0)
    x = (torch.randn(tokens, dim, device="cuda") * 3).to(torch.bfloat16)
    x[1] = 0
    _w, order, rank, _c = _routing(tokens, 16, topk)
    routed, q, inv = f8.dispatch_fp8(x, topk, order, rank)
    r_routed, r_q, r_inv = f8.dispatch_fp8_reference(x, topk, order, rank)
    assert torch.equal(routed, r_routed)
    same_fp8((q, inv), (r_q, r_inv), exact=True)


@pytest.mark.parametrize(("tokens", "dim", "topk"), [(8192, 2048, 6), (37, 100, 2)])
def test_combine_backward_kernel_with_the_gradients_fp8_copy(tokens, dim, topk):
    torch.manual_seed(0)
    experts = 16
    weights, order, rank, counts = _routing(tokens, experts, topk)
    grad = torch.randn(tokens, dim, device="cuda").to(torch.bfloat16)
    y_sorted = torch.randn(tokens * topk, dim, device="cuda").to(torch.bfloat16)
    col = f8.pow2_scale_reference(torch.rand(experts, dim, device="cuda") * 100).reciprocal()
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    got = f8.combine_backward_fp8(grad, y_sorted, weights, rank, col, offs)
    want = f8.combine_backward_fp8_reference(grad, y_sorted, weights, rank, col, offs)
    assert torch.equal(got[0], want[0])  # the rows' gradients
    torch.testing.assert_close(got[1], want[1], atol=1e-3, rtol=1e-4)  # the weights'
    same_fp8(got[2:], want[2:], exact=True)
    # and the same as the unfused kernels: the combine's backward, then the rows cast
    from trainer.model.permute import combine

    y = y_sorted.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    combine(y, w, order, rank).backward(grad)
    assert torch.equal(y.grad, got[0])
    # the weights' dot products: the same sum, which the two kernels may order differently
    torch.testing.assert_close(w.grad, got[1], atol=1e-3, rtol=1e-4)
    same_fp8(got[2:], f8.fp8_rows(y.grad, col, offs), exact=True)


@pytest.mark.parametrize("compile", [False, True])
def test_fused_moves_match_the_moves_then_the_experts(fp8_grouped_gpu, compile):
    """The MoE's routed path through Fp8MoEFunction against the moves (dispatch, combine)
    around Fp8ExpertsFunction: the same output and gradients, to the bit in eager (but
    the gate weights': each a dot product that the two kernels may sum in another order)."""
    experts = _experts()
    experts.__class__ = f8.Fp8GroupedExperts
    tokens, topk = 600, 3
    weights, order, rank, counts = _routing(tokens, 8, topk)
    x = torch.randn(tokens, 256, device="cuda").to(torch.bfloat16).requires_grad_()
    weights.requires_grad_()
    results = []
    for fused in (True, False):
        experts.fuse_moves = fused

        def routed(x, weights, order, rank, counts):
            return experts.route(x, weights, order, rank, counts, topk)

        fn = torch.compile(routed) if compile else routed
        for t in (x, weights, *experts.parameters()):
            t.grad = None
        out = fn(x, weights, order, rank, counts)
        out.float().square().sum().backward()
        results.append([out.detach(), x.grad.clone(), weights.grad.clone(),
                        *(p.grad.clone() for p in experts.parameters())])
    for name, a, b in zip(("out", "x", "weights", "w1", "w2", "w3"), *results, strict=True):
        assert torch.isfinite(a).all(), name
        if compile:
            assert rel(a, b) < 0.02, (name, rel(a, b))
        elif name == "weights":
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
        else:
            assert torch.equal(a, b), (name, rel(a, b))
