"""The router's top-k kernel (trainer/model/topk.py) against torch.topk: the same experts
in the same order, eager and compiled, at the configs' widths and at widths and row
counts that fill no block; rows with masked (-inf) and NaN scores; and the gate choosing
through it. Skipped without CUDA (conftest) or without Triton."""

from __future__ import annotations

import pytest
import torch

from trainer.model import topk as tk

pytestmark = pytest.mark.skipif(tk.triton is None, reason="Triton is not installed")


def _distinct(indices: torch.Tensor) -> bool:
    return bool((indices.sort(dim=1)[0].diff(dim=1) > 0).all())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("rows", "cols", "k"), [
    (49152, 48, 6), (4097, 64, 6), (1000, 256, 8), (37, 7, 3), (5, 160, 1), (3, 6, 6)])
def test_the_kernel_chooses_what_topk_chooses(rows, cols, k, compiled):
    torch.manual_seed(0)
    scores = torch.randn(rows, cols, device="cuda")  # no ties among random floats
    fn = torch.compile(tk.top_k) if compiled else tk.top_k
    got = fn(scores, k)
    assert got.dtype == torch.long and got.shape == (rows, k)
    torch.testing.assert_close(got, tk.reference(scores, k), rtol=0, atol=0)


def test_ties_masked_rows_and_nan_keep_k_distinct_experts_in_order():
    scores = torch.tensor([
        [0.5, 0.5, 0.5, 0.1, 0.5, 0.2],              # ties: the lowest index first
        [float("-inf")] * 4 + [0.3, 0.4],            # fewer finite scores than k
        [float("-inf")] * 6,                         # nothing finite
        [0.1, float("nan"), 0.9, 0.2, 0.3, 0.4],     # NaN above every number
    ], device="cuda")
    got = tk.top_k(scores, 4).cpu().tolist()
    assert got[0] == [0, 1, 2, 4]
    assert got[1] == [5, 4, 0, 1]
    assert got[2] == [0, 1, 2, 3]
    assert got[3] == [1, 2, 5, 4]
    ref = tk.reference(scores, 4)
    chosen = scores.gather(1, tk.top_k(scores, 4))
    torch.testing.assert_close(chosen, scores.gather(1, ref), equal_nan=True)


@pytest.mark.parametrize("groups", [1, 4], ids=["plain", "group-limited"])
def test_the_gate_routes_through_the_kernel_as_through_topk(groups, monkeypatch):
    from trainer.model import model as mm
    from trainer.model.args import ModelArgs

    args = ModelArgs(dim=256, n_routed_experts=48, n_activated_experts=6,
                     n_expert_groups=groups, topk_groups=2 if groups > 1 else 1)
    torch.manual_seed(0)
    gate = mm.Gate(args).cuda()
    torch.nn.init.normal_(gate.weight, std=0.1)
    gate.expert_bias.normal_(std=0.01)
    x = torch.randn(4096, args.dim, device="cuda")
    weights, indices = gate(x)
    assert _distinct(indices)
    monkeypatch.setattr(mm, "top_k", tk.reference)
    ref_weights, ref_indices = gate(x)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights)
