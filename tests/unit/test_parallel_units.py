"""The pure pieces of trainer/parallel/: stage split, expert-major reordering,
ParallelDims checks, the gradient-scaling and all-reduce autograd Functions, the
one-process form of clip_grad_norm."""

from __future__ import annotations

import pytest
import torch

from trainer.model import ModelArgs, Transformer
from trainer.parallel import ParallelDims, clip_grad_norm
from trainer.parallel.expert import _expert_major_order, _ScaleGrad
from trainer.parallel.pipeline import split_model, stage_layers


@pytest.mark.parametrize(("n_layers", "pp", "expected"), [
    (2, 2, [[0], [1]]),
    (5, 2, [[0, 1, 2], [3, 4]]),
    (7, 3, [[0, 1, 2], [3, 4], [5, 6]]),
    (4, 4, [[0], [1], [2], [3]]),
])
def test_stage_layers_are_contiguous_and_cover_the_model(n_layers, pp, expected):
    stages = [stage_layers(n_layers, pp, s) for s in range(pp)]
    assert stages == expected


def test_split_model_keeps_names_and_ends():
    torch.manual_seed(0)
    full = Transformer(ModelArgs(n_layers=3))
    names = set(full.state_dict())
    first = split_model(Transformer(ModelArgs(n_layers=3)), 2, 0)
    last = split_model(Transformer(ModelArgs(n_layers=3)), 2, 1)
    assert list(first.layers) == ["0", "1"] and list(last.layers) == ["2"]
    assert first.embed is not None and first.output is None and first.norm is None
    assert last.embed is None and last.output is not None
    assert set(first.state_dict()) | set(last.state_dict()) == names
    assert not set(first.state_dict()) & set(last.state_dict())
    # the two stages chained compute the full model's logits
    torch.manual_seed(0)
    ref = Transformer(ModelArgs(n_layers=3))
    first.load_state_dict({k: v for k, v in ref.state_dict().items()
                           if k in first.state_dict()})
    last.load_state_dict({k: v for k, v in ref.state_dict().items() if k in last.state_dict()})
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens)), ref(tokens))


def test_expert_major_order():
    # 2 source ranks x 2 local experts; received rows: src0 [e0: 2 rows, e1: 1],
    # src1 [e0: 1, e1: 3]
    recv = torch.tensor([[2, 1], [1, 3]])
    order = _expert_major_order(recv)
    # rows 0-1 (src0 e0), 3 (src1 e0), 2 (src0 e1), 4-6 (src1 e1)
    assert order.tolist() == [0, 1, 3, 2, 4, 5, 6]
    assert _expert_major_order(torch.zeros(2, 2, dtype=torch.long)).numel() == 0


def test_scale_grad_scales_only_the_gradient():
    x = torch.ones(3, requires_grad=True)
    y = _ScaleGrad.apply(x, 0.25)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.25))


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"dp_replicate": 1, "dp_shard": 2, "tp": 2, "pp": 1, "ep": 1, "world_size": 2},
     "world size is 2"),
    ({"dp_replicate": 1, "dp_shard": 2, "tp": 1, "pp": 1, "ep": 4, "world_size": 2},
     "ep (4) must divide dp_shard (2)"),
    ({"dp_replicate": 1, "dp_shard": -1, "tp": 3, "pp": 1, "ep": 1, "world_size": 4},
     "not divisible"),
    ({"dp_replicate": 2, "dp_shard": 1, "tp": 2, "pp": 1, "ep": 1, "world_size": 4},
     "plain DDP"),
])
def test_parallel_dims_reject_bad_degrees(kwargs, words):
    with pytest.raises(ValueError) as err:
        ParallelDims(**kwargs)
    assert words in str(err.value)


def test_parallel_dims_fill_and_split():
    dims = ParallelDims(1, -1, 1, 2, 2, 8)
    assert dims.dp_shard == 4 and dims.dp_shard_mod_ep == 2 and dims.dp_degree == 4
    assert dims.fsdp_enabled and not dims.ddp_enabled


def test_clip_grad_norm_matches_torch_in_one_process():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for m in (a, b):
        m(torch.randn(2, 4)).pow(2).sum().backward()
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pb.grad = pa.grad.clone()
    ours = clip_grad_norm(list(a.parameters()), 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.5)
    torch.testing.assert_close(ours, theirs)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_clip_inside_the_fused_adamw_equals_clipping_first():
    """With a fused AdamW, clip_grad_norm hands the clip coefficient to the optimizer's
    kernel (grad_scale) instead of scaling the gradients: the same updates as clipping
    first, step after step, whether the clip bites (large gradients) or not (small)."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 8) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    # eps of the gradients' order, so that the update depends on their scale
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, eps=0.5, fused=True) for m in models]
    first, inside, unclipped = models
    for scale in (30.0, 0.01, 20.0):
        x = torch.randn(4, 8)
        for m in models:
            (scale * m(x)).pow(2).sum().backward()
        norm_first = clip_grad_norm(list(first.parameters()), 1.0)
        norm_inside = clip_grad_norm(list(inside.parameters()), 1.0, fused_optimizer=opts[1])
        torch.testing.assert_close(norm_first, norm_inside)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for pa, pb in zip(first.parameters(), inside.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    # and the clip did change the updates
    assert not torch.allclose(first.weight, unclipped.weight, rtol=1e-3)


def test_sharded_gradients_are_clipped_without_waiting_for_the_gpu(one_rank):
    """DTensor gradients: without an optimizer that scales them, one multiply over their
    local tensors by the coefficient tensor (the value is never read on the host); with
    trainer.adamw's, none is touched and the optimizer gets the scale."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from trainer.adamw import AdamW

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    values = [torch.randn(4, 3) * 10, torch.randn(5) * 10]
    params = [torch.nn.Parameter(distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]))
              for v in values]

    def grads():
        for p, v in zip(params, values, strict=True):
            p.grad = distribute_tensor(v.clone(), mesh, [Shard(0)])

    grads()
    reference = [torch.nn.Parameter(v.clone()) for v in values]
    for r, v in zip(reference, values, strict=True):
        r.grad = v.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):  # item(), float(), bool() of a tensor end here
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.reads += 1
            return func(*args, **(kwargs or {}))

    with HostReads():
        norm = clip_grad_norm(params, 1.0)
    assert HostReads.reads == 0
    torch.testing.assert_close(norm, expected)
    clipped = torch.cat([p.grad.to_local().flatten() for p in params])
    torch.testing.assert_close(clipped.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-6)
    grads()
    opt = AdamW(params, lr=1e-3)
    clip_grad_norm(params, 1.0, fused_optimizer=opt)
    assert all(isinstance(p.grad, DTensor) for p in params)
    assert torch.equal(params[0].grad.to_local(), values[0])
    torch.testing.assert_close(opt.grad_scale, expected + 1e-6, rtol=1e-5, atol=1e-6)


def test_selective_checkpointing_recomputes_all_but_matmuls():
    """Same loss and gradients in every mode; in backward, "full" runs the forward
    matmuls again, "selective" only the cheap ops between them (here SiLU and sort)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from trainer.model.model import ModelArgs, Transformer
    from trainer.parallel.apply import apply_activation_checkpointing

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    tokens = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(1))
    runs = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=64, n_layers=3, mtp_depth=1, max_seq_len=64))
        apply_activation_checkpointing(model, mode)
        out = model(tokens[:, :-1], tokens[:, 1:])
        with CountOps() as ops:
            out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs[mode] = (out.loss.item(), grads, ops.calls)
    for mode in ("selective", "full"):
        assert runs[mode][0] == runs["none"][0]
        assert torch.allclose(runs[mode][1], runs["none"][1], atol=1e-6)
    none, selective, full = (runs[m][2] for m in ("none", "selective", "full"))
    assert selective["mm"] == none["mm"] < full["mm"]
    assert selective["silu"] > none["silu"] and selective["sort"] > none["sort"]


def test_selective_checkpointing_saves_fp8_matmuls_like_bf16_ones():
    from torch.utils.checkpoint import CheckpointPolicy

    from trainer.parallel.apply import _selective_policy

    policy = _selective_policy()
    aten = torch.ops.aten
    for op in (aten.mm, aten._grouped_mm, aten._scaled_mm, aten._scaled_grouped_mm):
        assert policy(None, op.default) == CheckpointPolicy.MUST_SAVE, op
    for op in (aten.silu, aten.sort, aten._to_copy):
        assert policy(None, op.default) == CheckpointPolicy.PREFER_RECOMPUTE, op


def _sharded_tiny(tmp_path, **sections):
    """tiny.toml with ``sections``, its model under apply_fsdp on the one rank (one_rank),
    as the config's [parallel] says; returns (config, model)."""
    from helpers import tiny_config

    from trainer.config import load_config
    from trainer.model import Transformer
    from trainer.parallel import ParallelDims
    from trainer.parallel.apply import apply_fsdp

    cfg = load_config(tiny_config(tmp_path, "sharded", **sections))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    apply_fsdp(model, ParallelDims(1, -1, 1, 1, 1, 1), "cpu", cfg.parallel)
    return cfg, model


def test_fsdp_bf16_params_gather_in_bf16_except_the_routers(tmp_path, one_rank):
    """parallel.fsdp_param_dtype = "bfloat16": inside forward every block's weights are
    bf16 (gathered so), the routers' stay fp32, and the gradients reach the sharded fp32
    parameters in fp32 (one rank, gloo)."""
    from trainer.model.model import Gate

    cfg, model = _sharded_tiny(tmp_path, parallel={"fsdp_param_dtype": "bfloat16"})
    seen = {}

    def record(module, _args):  # fully_shard renames the class (FSDPGate)
        kind = "Gate" if isinstance(module, Gate) else "Linear"
        seen.setdefault(kind, set()).update(p.dtype for p in module.parameters(recurse=False))

    for module in model.modules():
        if isinstance(module, (Gate, torch.nn.Linear)):
            module.register_forward_pre_hook(record)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, tokens)
    out.loss.backward()
    assert seen["Gate"] == {torch.float32}
    assert seen["Linear"] == {torch.bfloat16}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


def test_fsdp_prefetch_wires_each_block_to_the_next_and_previous_ones(tmp_path, one_rank):
    """parallel.fsdp_prefetch = 2: each block (layers, then MTP) all-gathers the next two
    in forward and the previous two in backward (one rank, gloo)."""
    _, model = _sharded_tiny(tmp_path, model={"mtp_depth": 1, "n_layers": 4},
                             parallel={"fsdp_prefetch": 2})
    blocks = [*model.layers.values(), model.mtp]
    states = [b._get_fsdp_state() for b in blocks]
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        state = block._get_fsdp_state()
        assert state._states_to_forward_prefetch == states[i + 1:i + 3]
        assert state._states_to_backward_prefetch == states[max(0, i - 2):i][::-1]


def test_fsdp_order_puts_each_blocks_experts_after_it(tmp_path):
    """With ep > 1 each MoE block's routed experts are an FSDP group of their own: prefetch
    counts them right after their block, in forward and in backward (whose gathers reach
    a block before the experts inside it); without, the groups are the blocks."""
    from helpers import tiny_config

    from trainer.config import load_config
    from trainer.model import MoE, Transformer
    from trainer.parallel.apply import fsdp_order

    cfg = load_config(tiny_config(tmp_path, "order", model={"mtp_depth": 1, "n_layers": 3}))
    model = Transformer(cfg.model)
    l0, l1, l2 = model.layers.values()
    mtp = model.mtp

    def experts(block):
        (moe,) = [m for m in block.modules() if isinstance(m, MoE)]
        return moe.experts

    assert not [m for m in l0.modules() if isinstance(m, MoE)]  # n_dense_layers = 1
    blocks = [l0, l1, l2, mtp]
    assert fsdp_order(blocks, experts_apart=False) == (blocks, blocks[::-1])
    forward, backward = fsdp_order(blocks, experts_apart=True)
    assert forward == [l0, l1, experts(l1), l2, experts(l2), mtp, experts(mtp)]
    assert backward == [mtp, experts(mtp), l2, experts(l2), l1, experts(l1), l0]
