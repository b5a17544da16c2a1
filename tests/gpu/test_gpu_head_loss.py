"""The head's loss op (trainer/model/head_loss.py) on the GPU: both of its Triton passes
(whole rows, and rows in blocks) against the reference arithmetic, and the whole op
against the head as a matmul and F.cross_entropy (``cross_entropy_head``), eager and
compiled, with vocabularies that do not fill the last block. Skipped without CUDA
(conftest) or without Triton."""

from __future__ import annotations

import pytest
import torch

from trainer.model import head_loss as hl

pytestmark = pytest.mark.skipif(hl.triton is None, reason="Triton is not installed")


@pytest.mark.parametrize("whole_rows", [True, False], ids=["whole-rows", "blocks"])
@pytest.mark.parametrize(("rows", "vocab", "dtype"), [
    (4096, 32768, torch.bfloat16), (37, 1000, torch.bfloat16), (300, 5000, torch.float32)])
def test_the_pass_matches_the_reference(rows, vocab, dtype, whole_rows):
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda") * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    mine, ref = logits.clone(), logits.clone()
    losses = hl.loss_and_grad_(mine, targets, whole_rows=whole_rows)
    expected = hl.loss_and_grad_reference(ref, targets)
    torch.testing.assert_close(losses, expected, atol=1e-4, rtol=1e-5)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mine, ref, **tol)
    assert mine.float().sum(dim=1).abs().max() < (5e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("rows", "dim", "vocab"), [(8192, 1024, 32768), (513, 256, 3000)])
def test_the_op_matches_cross_entropy(rows, dim, vocab, compiled):
    torch.manual_seed(0)
    h = torch.randn(rows, dim, device="cuda").to(torch.bfloat16)
    w = (torch.randn(vocab, dim, device="cuda") * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    fn = torch.compile(hl.head_loss) if compiled else hl.head_loss
    loss, *grads = hl.loss_and_grads(fn, h, w, targets, 0.3)
    expected, *expected_grads = hl.loss_and_grads(hl.cross_entropy_head, h, w, targets, 0.3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    for mine, ref in zip(grads, expected_grads, strict=True):
        assert mine.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), ref.float(), atol=1e-2 * ref.abs().max().item(),
                                   rtol=2e-2)
