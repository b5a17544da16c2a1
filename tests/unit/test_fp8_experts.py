"""The routed experts in FP8 (trainer/model/fp8_experts.py) on the CPU: the quantisation
rules of the plain expressions the GPU kernels are tested against, and the autograd
arithmetic of Fp8ExpertsFunction (the scaled grouped GEMM emulated on dequantised
operands) against the experts in full precision. The kernels themselves run in
tests/gpu/test_gpu_fp8_experts.py."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, tiny_doc

from trainer.model import fp8_experts as f8
from trainer.model.model import GroupedExperts

E4M3_STEP = 2.0 ** -3  # e4m3 keeps 3 mantissa bits: neighbours differ by at most 1/8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_scales_are_the_largest_powers_of_two_that_fit():
    amax = torch.tensor([448.0, 447.0, 449.0, 1.0, 3e-3, 0.0, 7e4])
    scale = f8.pow2_scale_reference(amax)
    assert torch.equal(scale, torch.exp2(torch.floor(torch.log2(448.0 / amax.clamp(min=1e-12)))))
    fits = amax * scale
    assert (fits <= 448).all() and ((fits > 224) | (amax == 0)).all()
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_rows_dequantise_within_one_e4m3_step():
    torch.manual_seed(0)
    x = (torch.randn(64, 96) * torch.logspace(-3, 3, 64).unsqueeze(1)).to(torch.bfloat16)
    x[5] = 0
    q, inv = f8.rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and inv.shape == (64,)
    back = q.float() * inv.unsqueeze(1)
    err = (back - x.float()).abs()
    assert (err <= E4M3_STEP * x.float().abs() / 2 + inv.unsqueeze(1) * 2.0 ** -9).all()
    assert (q.float().abs().amax(1)[x.float().abs().amax(1) > 0] >= 224).all()
    assert torch.equal(back[5], torch.zeros(96))


def test_weights_scale_per_output_row():
    torch.manual_seed(0)
    w1, w3 = torch.randn(3, 32, 48), torch.randn(3, 32, 48) * 10
    q, inv = f8.weight_rows_reference(w1, w3)  # forward: per output row
    assert q.shape == (3, 64, 48) and inv.shape == (3, 64)
    assert torch.equal(q[:, :32], f8.rows_reference(w1)[0])
    assert torch.equal(inv[:, 32:], f8.rows_reference(w3)[1])


def test_input_gradients_fold_the_weight_scales_into_the_rows_they_multiply():
    """The input gradient g @ w per expert reads the forward's e4m3 weights, scaled per
    output row, i.e. along what it contracts: the scales go into g's columns, by each
    row's expert, before g is quantised per row."""
    torch.manual_seed(0)
    w = torch.randn(3, 32, 48) * torch.logspace(-3, 1, 32).unsqueeze(1)  # (E, N, K)
    wq, w_inv = f8.weight_rows_reference(w)
    counts = torch.tensor([5, 0, 9])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    expert = f8.expert_of_rows(offs, 14)
    assert expert.tolist() == [0] * 5 + [2] * 9
    g = torch.randn(14, 32).to(torch.bfloat16)  # the gradient of the output (M, N)
    gq, g_inv = f8.rows_reference(g, w_inv, offs)
    assert torch.equal(gq, f8.rows_reference(g.float() * w_inv[expert])[0])
    assert torch.equal(g_inv, f8.rows_reference(g.float() * w_inv[expert])[1])
    got = f8.scaled_grouped_mm_reference(gq, wq, g_inv, torch.ones(3, 48), offs)
    dequantised = wq.float() * w_inv.unsqueeze(-1)
    want = torch.einsum("mn,mnk->mk", g.float(), dequantised[expert])  # row by row
    assert rel(got, want) < E4M3_STEP / 2, rel(got, want)


def test_swiglu_outputs_and_gradient_with_their_fp8_copies():
    torch.manual_seed(0)
    h = (torch.randn(20, 64) * 2).requires_grad_()
    a, b = h.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(a) * b
    g = torch.randn(20, 32)
    expected.backward(g)
    out, q, inv = f8.swiglu_reference(h.detach())
    torch.testing.assert_close(out, expected.detach())
    assert torch.equal(q, f8.rows_reference(expected.detach())[0])
    dh, dq, dinv = f8.swiglu_backward_reference(h.detach(), g)
    torch.testing.assert_close(dh, h.grad)
    assert torch.equal(dinv, f8.rows_reference(h.grad)[1])


def test_scaled_grouped_mm_emulation_is_per_group():
    torch.manual_seed(0)
    a = torch.randn(10, 16).to(torch.float8_e4m3fn)
    b = torch.randn(2, 24, 16).to(torch.float8_e4m3fn)  # (E, N, K), used transposed
    a_inv, b_inv = torch.rand(10) + 0.5, torch.rand(2, 24) + 0.5
    offs = torch.tensor([4, 10], dtype=torch.int32)
    out = f8.scaled_grouped_mm_reference(a, b.transpose(1, 2), a_inv, b_inv, offs)
    for e, (lo, hi) in enumerate([(0, 4), (4, 10)]):
        want = (a[lo:hi].float() * a_inv[lo:hi, None]) @ (b[e].float() * b_inv[e, :, None]).T
        torch.testing.assert_close(out[lo:hi], want.to(torch.bfloat16))


def _experts(n=4, dim=64, inter=48):
    torch.manual_seed(0)
    experts = GroupedExperts(n, dim, inter)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    return experts


@pytest.mark.parametrize("counts", [[7, 0, 13, 4], [1, 1, 1, 30]])
def test_fp8_experts_follow_full_precision(counts):
    experts = _experts()
    counts_t = torch.tensor(counts)
    x = torch.randn(sum(counts), 64).to(torch.bfloat16).float().requires_grad_()
    want = experts(x, counts_t)  # the per-expert loop in fp32
    g = torch.randn_like(want)
    want.backward(g)
    grads = [t.grad.clone() for t in (x, experts.w1, experts.w2, experts.w3)]
    for t in (x, *experts.parameters()):
        t.grad = None
    offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    out = f8.Fp8ExpertsFunction.apply(xb, experts.w1, experts.w2, experts.w3, offs)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    out.backward(g.to(torch.bfloat16))
    assert rel(out, want) < 0.08, rel(out, want)
    got = [xb.grad, experts.w1.grad, experts.w2.grad, experts.w3.grad]
    for name, a, b in zip(("x", "w1", "w2", "w3"), got, grads, strict=True):
        assert a.shape == b.shape and a.dtype == (torch.bfloat16 if name == "x" else b.dtype)
        assert rel(a, b) < 0.08, (name, rel(a, b))
    for w in experts.parameters():
        assert w.grad.is_contiguous()
    # an expert that saw no token gets a zero gradient
    if 0 in counts:
        e = counts.index(0)
        assert experts.w2.grad[e].abs().max() == 0 and experts.w1.grad[e].abs().max() == 0


def test_weight_gradients_see_the_tokens_strided_under_compile(monkeypatch):
    """The weight gradients' grouped GEMM gets a^T with the tokens as its strided
    dimension even when its input is a fused gather of a compiled graph: the 2d-2d
    grouped GEMM asserts on the GPU when the tokens are contiguous and a group's count
    is not a multiple of 8 (inductor laid a fused, transposed input out that way)."""
    seen = []
    grouped_mm = torch._grouped_mm

    def recording(a, b, offs, **kwargs):
        seen.append((a.stride(), b.stride()))
        return grouped_mm(a, b, offs=offs, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    counts = torch.tensor([5, 0, 3, 9])  # none a multiple of 8 but the empty one
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(17, 32, generator=gen).to(torch.bfloat16)
    act = torch.randn(17, 24, generator=gen).to(torch.bfloat16)
    order = torch.randperm(17, generator=gen)

    def weight_grad(g, act, order, offs):  # the output gradient gathered, then the GEMM
        return f8.grouped_weight_grad((g * 2).index_select(0, order), act, offs)

    want = torch.stack([(2 * g[order])[s:e].float().t() @ act[s:e].float()
                        for s, e in zip([0, *offs[:-1].tolist()], offs.tolist(), strict=True)])
    for fn in (weight_grad, torch.compile(weight_grad, fullgraph=True)):
        seen.clear()
        out = fn(g, act, order, offs)
        assert out.shape == (4, 32, 24) and out.is_contiguous()
        assert rel(out, want) < 0.01
        assert seen == [((1, 32), (24, 1))], seen  # a^T: the tokens strided, as in eager
    assert out[1].abs().max() == 0  # the expert that saw no token


def test_fp8_experts_keep_the_full_precision_loop_on_the_cpu():
    experts = _experts()
    counts = torch.tensor([3, 5, 0, 2])
    x = torch.randn(10, 64)
    want = experts(x, counts)
    experts.__class__ = f8.Fp8GroupedExperts
    torch.testing.assert_close(experts(x, counts), want, atol=0, rtol=0)
    assert f8.supported(experts)
    assert not f8.supported(GroupedExperts(2, 64, 40))


# ---- training.fp8_experts: the option, its errors, the conversion ----

def _config(value, **parallel):
    return tiny_doc(training={"fp8_experts": value}, parallel=parallel)


def test_fp8_experts_option_and_its_errors_name_the_field():
    from trainer.config import InputError, parse_config

    assert parse_config(tiny_doc()).training.fp8_experts == "off"
    assert parse_config(_config("rowwise")).training.fp8_experts == "rowwise"
    for value, parallel, words in (("tensorwise", {}, "rowwise"),
                                   ("rowwise", {"tp": 2, "dp_shard": 1}, "tp > 1")):
        with pytest.raises(InputError) as err:
            parse_config(_config(value, **parallel), "cfg.toml")
        assert err.value.field == "training.fp8_experts", err.value
        assert words in str(err.value)


def test_fp8_experts_on_the_cpu_stop_the_run_naming_the_field(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    cfg = tiny_config(tmp_path, "cfg", training={"fp8_experts": "rowwise"})
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg),
                           "--out", str(tmp_path / "run"), "--steps", "1"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "training.fp8_experts" in proc.stderr and "this run is on cpu" in proc.stderr


def test_aligned_routed_experts_are_converted_the_rest_kept():
    from trainer.model import ModelArgs, Transformer
    from trainer.parallel.float8 import apply_fp8_experts

    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=48,
                                  n_layers=3, n_dense_layers=1, n_heads=4,
                                  n_routed_experts=4, n_activated_experts=2,
                                  kv_lora_rank=32, qk_nope_head_dim=16,
                                  qk_rope_head_dim=16, v_head_dim=16, max_seq_len=64))
    model.layers["2"].ffn.experts = GroupedExperts(4, 64, 40)  # 40: not a multiple of 16
    for w in model.layers["2"].ffn.experts.parameters():
        torch.nn.init.normal_(w)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = apply_fp8_experts(model, "rowwise", torch.device("cpu"), check=False)
    assert done == {"fp8": ["layers.1.ffn.experts"], "bf16": ["layers.2.ffn.experts"]}
    assert type(model.layers["1"].ffn.experts) is f8.Fp8GroupedExperts
    after = model.state_dict()  # same names and values: checkpoints carry over
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_schema_and_the_code_know_the_same_recipes():
    import json
    from pathlib import Path

    from trainer.parallel.float8 import EXPERT_RECIPES, RECIPES

    schema = json.loads((Path(f8.__file__).parents[1] / "schemas" /
                         "train_config.schema.json").read_text())
    training = schema["properties"]["training"]["properties"]
    assert training["fp8"]["enum"] == ["off", *RECIPES]
    assert training["fp8_experts"]["enum"] == ["off", *EXPERT_RECIPES]


@pytest.mark.parametrize("fused", [True, False])
def test_a_model_with_fp8_experts_trains_like_the_plain_one(monkeypatch, fused):
    """The whole model, routing included, through the grouped path on the CPU (the path
    the GPU takes, with the scaled GEMMs emulated): the loss and every gradient follow
    the model whose experts run the bf16 path's grouped GEMMs in full precision. Fused:
    the MoE's routed path as Fp8MoEFunction (the token moves and their casts together);
    not: the moves, then Fp8ExpertsFunction (as under expert parallelism)."""
    from trainer.model import ModelArgs, Transformer
    from trainer.parallel.float8 import apply_fp8_experts

    monkeypatch.setattr(GroupedExperts, "grouped", lambda self, x: True)
    calls = {"moe": 0, "experts": 0}
    for name, cls in (("moe", f8.Fp8MoEFunction), ("experts", f8.Fp8ExpertsFunction)):
        def counting(*args, _name=name, _apply=cls.apply):
            calls[_name] += 1
            return _apply(*args)
        monkeypatch.setattr(cls, "apply", counting)
    args = ModelArgs(vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3,
                     n_dense_layers=1, n_heads=4, n_routed_experts=8, n_activated_experts=2,
                     kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                     v_head_dim=16, max_seq_len=32, mtp_depth=1)
    models = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = Transformer(args)
        if fp8:
            done = apply_fp8_experts(model, "rowwise", torch.device("cpu"), check=False)
            assert len(done["fp8"]) == 3  # two MoE layers and the MTP block
            for name in done["fp8"]:
                model.get_submodule(name).fuse_moves = fused
        models.append(model)
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in models:
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        losses.append(float(out.loss.detach()))
    assert abs(losses[0] - losses[1]) < 0.01 * losses[0], losses
    plain = dict(models[0].named_parameters())
    routed = 0
    for name, p in models[1].named_parameters():
        assert p.grad is not None and p.grad.shape == plain[name].grad.shape, name
        if plain[name].grad.abs().max() == 0:
            continue
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(),
                                                    plain[name].grad.flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))
        routed += ".experts.w" in name
    assert routed == 9
    assert calls == ({"moe": 3, "experts": 0} if fused else {"moe": 0, "experts": 3})


def test_expert_parallelism_keeps_the_moves_apart_from_the_fp8_experts(one_rank, monkeypatch):
    """Under expert parallelism the all-to-alls run between the token moves and the
    experts, so the FP8 route must not fuse them: apply_ep turns fuse_moves off, and the
    route then runs the moves around the experts' installed forward (their all-to-alls),
    whose local experts run Fp8ExpertsFunction."""
    from torch.distributed.device_mesh import init_device_mesh

    from trainer.model import ModelArgs, Transformer
    from trainer.parallel.expert import apply_ep, moe_modules
    from trainer.parallel.float8 import apply_fp8_experts

    monkeypatch.setattr(GroupedExperts, "grouped", lambda self, x: True)
    used = []
    for cls in (f8.Fp8MoEFunction, f8.Fp8ExpertsFunction):
        monkeypatch.setattr(cls, "apply", lambda *a, _c=cls, _f=cls.apply: (
            used.append(_c.__name__), _f(*a))[1])
    args = ModelArgs(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2,
                     n_dense_layers=1, n_heads=2, n_routed_experts=4, n_activated_experts=2,
                     kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
                     v_head_dim=16, max_seq_len=16, mtp_depth=0)
    torch.manual_seed(0)
    model = Transformer(args)
    apply_fp8_experts(model, "rowwise", torch.device("cpu"), check=False)
    assert all(m.experts.fuse_moves for m in moe_modules(model))
    apply_ep(model, init_device_mesh("cpu", (1,)))
    assert [m.experts.fuse_moves for m in moe_modules(model)] == [False]
    assert GroupedExperts.fuse_moves  # the class's default is untouched
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert used == ["Fp8ExpertsFunction"]
