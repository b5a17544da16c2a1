"""The routed experts' SwiGLU kernels (trainer/model/swiglu.py) against the plain
expression: outputs and gradients, eager and compiled, shapes that do not fill the last
block. Skipped without CUDA (conftest) or without Triton."""

from __future__ import annotations

import pytest
import torch

from trainer.model import swiglu as sw

pytestmark = pytest.mark.skipif(sw.triton is None, reason="Triton is not installed")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("rows", "inter", "dtype"), [
    (4455, 1408, torch.bfloat16), (1000, 512, torch.bfloat16), (37, 100, torch.float32)])
def test_kernels_match_the_expression(rows, inter, dtype, compiled):
    torch.manual_seed(0)
    h = (torch.randn(rows, 2 * inter, device="cuda") * 3).to(dtype)
    g = torch.randn(rows, inter, device="cuda").to(dtype)
    fn = torch.compile(sw.swiglu) if compiled else sw.swiglu
    mine = h.clone().requires_grad_()
    ref = h.clone().requires_grad_()
    out = fn(mine)
    expected = sw.reference(ref)
    out.backward(g)
    expected.backward(g)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(mine.grad, ref.grad, **tol)
    assert mine.grad.shape == h.shape and out.shape == (rows, inter)
