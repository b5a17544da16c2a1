"""The output head's loss as one op (trainer/model/head_loss.py) on the CPU: the op
against the head as a matmul and F.cross_entropy (loss and both gradients, eager and
compiled, scaled as the MTP loss is), the in-place pass's arithmetic, the model's use of
it, and its FLOPs in torch's counter. The Triton pass is tested on the GPU
(tests/gpu/test_gpu_head_loss.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.model import ModelArgs, Transformer
from trainer.model import head_loss as hl


def _pair(rows: int, dim: int, vocab: int, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, dim, generator=g).to(dtype)
    w = (torch.randn(vocab, dim, generator=g) * 0.1).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    return h, w, targets


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_equals_cross_entropy_of_the_heads_logits(dtype, compiled):
    h, w, targets = _pair(300, 64, 1000, dtype)
    fn = torch.compile(hl.head_loss) if compiled else hl.head_loss
    loss, *grads = hl.loss_and_grads(fn, h, w, targets, 0.3)
    expected, *expected_grads = hl.loss_and_grads(hl.cross_entropy_head, h, w, targets, 0.3)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    tol = dict(atol=1e-7, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=2e-2)
    for mine, ref in zip(grads, expected_grads, strict=True):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.float(), ref.float(), **tol)


def test_the_pass_writes_softmax_minus_one_hot_in_place():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 5.0]])
    targets = torch.tensor([1, 3])
    x = logits.clone()
    losses = hl.loss_and_grad_(x, targets)
    lse = torch.logsumexp(logits, dim=1)
    torch.testing.assert_close(losses, lse - logits[torch.arange(2), targets])
    expected = torch.softmax(logits, dim=1)
    expected[torch.arange(2), targets] -= 1
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(losses[0], torch.log(torch.tensor(4.0)))


@pytest.mark.parametrize("mtp_depth", [0, 1])
def test_the_model_runs_its_head_through_the_op(mtp_depth):
    """Once per head (MTP's shifted one too), with the model's loss unchanged from the
    head as a matmul and cross-entropy."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(mtp_depth=mtp_depth))
    tokens = torch.randint(0, 256, (2, 17))
    calls = []
    real = hl.head_loss

    def spy(h, w, t):
        calls.append((tuple(h.shape), tuple(t.shape)))
        return real(h, w, t)

    import trainer.model.model as model_module
    mp = pytest.MonkeyPatch()
    mp.setattr(model_module, "fused_head_loss", spy)
    try:
        out = model(tokens[:, :-1], tokens[:, 1:])
    finally:
        mp.undo()
    dim = model.args.dim
    assert calls == [((32, dim), (32,))] + ([((30, dim), (30,))] if mtp_depth else [])
    norm_h = {}
    model.norm.register_forward_hook(lambda _m, _i, o: norm_h.setdefault("h", o))
    model(tokens[:, :-1], tokens[:, 1:])
    expected = F.cross_entropy(model.output(norm_h["h"]).flatten(0, 1).float(),
                               tokens[:, 1:].flatten())
    torch.testing.assert_close(out.lm_loss, expected, atol=1e-5, rtol=1e-5)


def test_the_flop_counter_sees_the_heads_three_gemms():
    from torch.utils.flop_counter import FlopCounterMode

    h, w, targets = _pair(64, 32, 100, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        hl.head_loss(h, w, targets).backward()
    assert counter.get_total_flops() == 3 * 2 * 64 * 32 * 100
