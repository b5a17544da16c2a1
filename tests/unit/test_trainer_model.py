"""Model: parameter counts, causality, routing, aux-loss-free balancing, MTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.model import ModelArgs, MoE, Transformer, count_params

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


def args_of(name: str) -> ModelArgs:
    return load_config(CONFIGS / f"{name}.toml").model


def test_671b_parameter_counts_match_deepseek_v3():
    args = args_of("671b")
    total = count_params(args, include_mtp=False)
    active = count_params(args, active_only=True, include_mtp=False)
    assert abs(total - 671e9) / 671e9 < 0.01, total
    assert abs(active - 37e9) / 37e9 < 0.03, active
    # the analytic count is checked against real modules with every kind of layer (3 dense,
    # 2 MoE, MTP), built on the meta device: never allocated
    few = ModelArgs(**{**vars(args), "n_layers": 5})
    with torch.device("meta"):
        model = Transformer(few)
    assert model.num_params() == count_params(few)
    assert model.num_params(include_mtp=False) == count_params(few, include_mtp=False)
    assert model.num_params(active_only=True) == count_params(few, active_only=True)
    assert 11e9 < count_params(args) - total < 12.5e9  # the MTP module


def test_16b_parameter_count_matches_deepseek_v2_lite():
    total = count_params(args_of("16b"))
    assert abs(total - 15.7e9) / 15.7e9 < 0.01, total


@pytest.mark.parametrize("extra", [{}, {"q_lora_rank": 16, "mtp_depth": 1, "n_expert_groups": 2,
                                        "topk_groups": 1, "score_func": "sigmoid"}])
def test_analytic_count_equals_module_count(extra):
    args = ModelArgs(**extra)
    model = Transformer(args)
    assert model.num_params() == count_params(args)
    assert model.num_params(active_only=True) == count_params(args, active_only=True)
    assert model.flops_per_token(64) > 6 * (model.num_params(active_only=True)
                                            - args.vocab_size * args.dim)


def test_layers_are_keyed_by_index():
    model = Transformer(ModelArgs(n_layers=3, n_dense_layers=1))
    assert list(model.layers.keys()) == ["0", "1", "2"]
    assert "layers.2.ffn.experts.w1" in model.state_dict()
    assert "layers.0.ffn.w1.weight" in model.state_dict()  # first layer dense


def test_attention_is_causal():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(q_lora_rank=16)).eval()
    tokens = torch.randint(0, 256, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-5)
    assert not torch.allclose(a[0, 8:], b[0, 8:], atol=1e-5)


def test_group_limited_routing_stays_in_selected_groups():
    torch.manual_seed(0)
    args = ModelArgs(dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
                     topk_groups=1, score_func="sigmoid", route_scale=2.5)
    moe = MoE(args)
    torch.nn.init.normal_(moe.gate.weight)
    weights, indices = moe.gate(torch.randn(64, 16))
    groups = indices // 2  # 2 experts per group
    assert (groups[:, 0] == groups[:, 1]).all()  # one group chosen: both experts in it
    assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5))  # normalised, scaled


def _imbalance(moe: MoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        moe(x)
    load = moe.tokens_per_expert.float()
    return float(load.max() / load.mean())


@pytest.mark.parametrize("speed", [0.0, 0.02])
def test_aux_free_bias_moves_toward_balance(speed):
    torch.manual_seed(0)
    args = ModelArgs(dim=16, moe_inter_dim=8, n_routed_experts=4, n_activated_experts=1,
                     bias_update_speed=speed, score_func="sigmoid")
    moe = MoE(args)
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    x = torch.randn(512, 16)
    with torch.no_grad():
        moe.gate.weight[0] += 0.5 * x.mean(0) / x.mean(0).norm() ** 2  # expert 0 favoured
    before = _imbalance(moe, x)
    for _ in range(100):
        _imbalance(moe, x)
        moe.update_bias(moe.tokens_per_expert)
    after = _imbalance(moe, x)
    assert before > 1.5
    if speed == 0:
        assert after == before and moe.gate.expert_bias.abs().sum() == 0
    else:
        assert after < 1.2, (before, after)
        assert moe.gate.expert_bias[0] < 0  # the overloaded expert was pushed down


def test_moe_matches_a_dense_reference():
    torch.manual_seed(0)
    moe = MoE(ModelArgs(dim=16, moe_inter_dim=8, n_routed_experts=4, n_activated_experts=2))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(10, 16)
    weights, indices = moe.gate(x)
    expected = moe.shared_experts(x)
    for t in range(10):
        for k in range(2):
            e, ex = int(indices[t, k]), moe.experts
            hidden = torch.nn.functional.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])
            expected[t] += weights[t, k] * (ex.w2[e] @ hidden)
    assert torch.allclose(moe(x), expected, atol=1e-5)
    assert int(moe.tokens_per_expert.sum()) == 20


def test_dispatch_and_combine_move_rows_as_the_routing_says_with_their_gradients():
    """The MoE's two moves (trainer.model.permute, on the CPU the plain gathers): row i of
    the dispatch is token order[i] // topk's; the combine sums each token's k expert rows,
    weighted; both gradients are checked numerically. The GPU kernels are checked against
    these in tests/gpu/test_gpu_permute.py."""
    from trainer.model.permute import combine, dispatch, sort_slots

    torch.manual_seed(0)
    tokens, topk, dim = 5, 3, 4
    by_expert, order, rank = sort_slots(torch.randint(0, 4, (tokens, topk)))
    assert by_expert.diff().ge(0).all() and torch.equal(rank[order], torch.arange(tokens * topk))
    x = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    y_sorted = torch.randn(tokens * topk, dim, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(tokens, topk, dtype=torch.float64, requires_grad=True)
    assert torch.equal(dispatch(x, topk, order, rank), x[order // topk])
    expected = torch.stack([sum(weights[t, k] * y_sorted[rank[t * topk + k]]
                                for k in range(topk)) for t in range(tokens)])
    assert torch.allclose(combine(y_sorted, weights, order, rank), expected)
    assert torch.autograd.gradcheck(lambda a: dispatch(a, topk, order, rank), (x,))
    assert torch.autograd.gradcheck(lambda a, w: combine(a, w, order, rank),
                                    (y_sorted, weights))


def test_the_moe_dispatches_its_tokens_in_autocasts_dtype(monkeypatch):
    """Under autocast, fp32 tokens are cast before the dispatch repeats their rows top-k
    times, so the repeated rows (and expert parallelism's all-to-all) are bf16; without
    it, the tokens keep their dtype."""
    from trainer.model import model as model_module
    from trainer.model.model import MoE

    seen = []
    dispatch = model_module.dispatch

    def spy(x, *args):
        seen.append(x.dtype)
        return dispatch(x, *args)
    monkeypatch.setattr(model_module, "dispatch", spy)
    torch.manual_seed(0)
    moe = MoE(ModelArgs(dim=32, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2))
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    moe(x)
    assert seen == [torch.bfloat16, torch.float32]


def test_mtp_adds_a_weighted_loss_and_gets_gradients():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(mtp_depth=1, mtp_loss_weight=0.5))
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.mtp_loss)
    out.loss.backward()
    assert model.mtp.eh_proj.weight.grad.abs().sum() > 0


def test_mtp_projects_the_embedding_first_then_the_hidden_state():
    """eh_proj's input is [enorm(embedding of token i+1), hnorm(hidden state i)], the
    layout of the released DeepSeek-V3 MTP weights."""
    torch.manual_seed(0)
    args = ModelArgs(mtp_depth=1)
    model = Transformer(args)
    with torch.no_grad():  # keep the first half of eh_proj's input only
        model.mtp.eh_proj.weight.copy_(torch.cat(
            [torch.eye(args.dim), torch.zeros(args.dim, args.dim)], dim=1))
        model.mtp.enorm.weight.uniform_(0.5, 1.5)
    seen = {}
    model.mtp.block.register_forward_pre_hook(lambda _m, inputs: seen.update(x=inputs[0]))
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens[:, :-1], tokens[:, 1:])
    expected = model.mtp.enorm(model.embed(tokens[:, 1:]))
    assert torch.allclose(seen["x"], expected, atol=1e-6)


@pytest.mark.parametrize("mtp_depth", [0, 1])
def test_flops_per_token_matches_counted_matmuls(mtp_depth):
    """The MFU numerator against torch's own count of the matmul and attention FLOPs of
    one forward and backward pass (routed experts: only the chosen ones run)."""
    from torch.utils.flop_counter import FlopCounterMode

    args = ModelArgs(dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_heads=4,
                     n_routed_experts=8, n_activated_experts=2, vocab_size=512,
                     max_seq_len=64, mtp_depth=mtp_depth)
    model = Transformer(args)
    batch, seq = 2, 64
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1))
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    counted = counter.get_total_flops()
    estimated = model.flops_per_token(seq) * batch * seq
    # the estimate counts norm weights as parameters (no matmul): a fraction of a percent
    assert abs(estimated - counted) / counted < 0.02, (estimated, counted)


def _balance_loss_by_hand(x, weight, gate, topk, batch):
    """DeepSeek-V3 eq. 17-20, one sequence at a time: sum_i f_i P_i, averaged."""
    n = weight.size(0)
    with torch.no_grad():
        _, indices = gate(x)
    scores = torch.sigmoid(x @ weight.T)
    total = 0.0
    per_seq = zip(scores.view(batch, -1, n), indices.view(batch, -1, topk), strict=True)
    for seq_scores, seq_idx in per_seq:
        t = seq_scores.size(0)
        counts = torch.stack([(seq_idx == i).sum() for i in range(n)]).float()
        f = counts * n / (topk * t)
        p = (seq_scores / seq_scores.sum(dim=-1, keepdim=True)).mean(dim=0)
        total = total + (f * p).sum()
    return total / batch


def test_sequence_balance_loss_moves_only_the_router_gradient_by_its_own():
    import dataclasses

    torch.manual_seed(0)
    args = ModelArgs(n_layers=2, n_dense_layers=1, n_routed_experts=8, n_activated_experts=2,
                     n_expert_groups=2, topk_groups=1, score_func="sigmoid", route_scale=2.5)
    off = Transformer(args)
    on = Transformer(dataclasses.replace(args, balance_loss_weight=0.01))
    on.load_state_dict(off.state_dict())
    seen = {}
    on.layers["1"].ffn.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0]))
    tokens = torch.randint(0, 256, (3, 17))
    loss_off = off(tokens[:, :-1], tokens[:, 1:]).loss
    loss_on = on(tokens[:, :-1], tokens[:, 1:]).loss
    assert torch.equal(loss_off, loss_on)  # the balance loss is not in the reported loss
    loss_off.backward()
    loss_on.backward()
    grads_off = {n: p.grad for n, p in off.named_parameters()}
    grads_on = {n: p.grad for n, p in on.named_parameters()}
    # the experts, the head and the final norm see the same gradients bit for bit
    for name in grads_on:
        if name.startswith(("layers.1.ffn.experts", "layers.1.ffn.shared_experts", "output",
                            "norm")):
            assert torch.equal(grads_on[name], grads_off[name]), name
    # the router's gradient moves by exactly the weighted balance loss's gradient
    gate = on.layers["1"].ffn.gate
    weight = gate.weight.detach().clone().requires_grad_()
    x = seen["x"].detach().reshape(-1, args.dim)
    (expected,) = torch.autograd.grad(0.01 * _balance_loss_by_hand(x, weight, gate, 2, 3),
                                      weight)
    moved = grads_on["layers.1.ffn.gate.weight"] - grads_off["layers.1.ffn.gate.weight"]
    assert expected.abs().max() > 1e-5
    assert torch.allclose(moved, expected, atol=1e-7, rtol=1e-4)
    # and flows on into the layers below it, as a loss on the router's input does
    assert not torch.equal(grads_on["layers.0.attn.wo.weight"],
                           grads_off["layers.0.attn.wo.weight"])


def test_balance_loss_off_leaves_the_graph_as_it_was():
    torch.manual_seed(0)
    moe = Transformer(ModelArgs()).layers["1"].ffn
    x = torch.randn(2, 8, 64, requires_grad=True)
    assert type(moe(x).grad_fn).__name__ != "AddBalanceLossBackward"
    moe.balance_loss_weight = 1e-4
    assert type(moe(x).grad_fn).__name__ == "AddBalanceLossBackward"


@pytest.mark.parametrize("chunk", [7, 40, 1000])
def test_chunked_head_loss_equals_cross_entropy_with_its_gradients(chunk):
    from trainer.model.model import ChunkedHeadLoss

    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), targets)
    (0.3 * ref).backward()
    ref_h, ref_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = ChunkedHeadLoss.apply(h, w, targets, chunk)
    (0.3 * loss).backward()  # the incoming gradient scales both
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(h.grad, ref_h, atol=1e-7)
    assert torch.allclose(w.grad, ref_w, atol=1e-7)


def test_chunked_head_loss_is_what_the_model_trains_on():
    args = ModelArgs(**{**vars(args_of("tiny")), "mtp_depth": 1})
    torch.manual_seed(0)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    targets = torch.randint(0, args.vocab_size, (2, 32))
    results = []
    for chunk in (0, 9):
        model.zero_grad()
        model.loss_chunk_tokens = chunk
        out = model(tokens, targets)
        out.loss.backward()
        results.append((out.lm_loss.detach(), out.mtp_loss.detach(),
                        model.output.weight.grad.clone(), model.embed.weight.grad.clone()))
    (lm0, mtp0, head0, emb0), (lm1, mtp1, head1, emb1) = results
    assert torch.allclose(lm0, lm1, atol=1e-6) and torch.allclose(mtp0, mtp1, atol=1e-6)
    assert torch.allclose(head0, head1, atol=1e-6) and torch.allclose(emb0, emb1, atol=1e-6)
