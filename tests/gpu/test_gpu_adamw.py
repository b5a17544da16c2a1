"""trainer/adamw.py's Triton update against torch's fused AdamW: parameters and both
moments over several steps, with and without a gradient scale, two parameter groups
(with and without weight decay) and sizes that do not fill the last block; checkpoints
of one load into the other, and a checkpoint of torch's unfused AdamW into this one; only a
scaled step runs the kernel; FSDP2's DTensor parameters run it on their local tensors.
Skipped without CUDA (conftest) or without Triton."""

from __future__ import annotations

import pytest
import torch

from trainer import adamw

pytestmark = pytest.mark.skipif(adamw.triton is None, reason="Triton is not installed")

SHAPES = [(64, 8, 33), (1000, 129), (7,), (4096,), (3, 4097)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]


def _groups(params):
    return [{"params": params[:2] + params[4:], "weight_decay": 0.1},
            {"params": params[2:4], "weight_decay": 0.0}]


def _run(opt, params, steps: int, scaled: bool) -> None:
    for i in range(steps):
        gen = torch.Generator(device="cuda").manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen) * (1 + i)
        if scaled:  # as the trainer's gradient clip hands it over: 1 / coefficient
            opt.grad_scale = torch.tensor(2.5 + i, device="cuda")
        opt.step()
        for p in params:
            p.grad = None


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_update_matches_torch_fused_adamw(scaled):
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    mine, ref = _params(), _params()
    opt = adamw.AdamW(_groups(mine), **hyper)
    expected = torch.optim.AdamW(_groups(ref), fused=True, **hyper)
    _run(opt, mine, 6, scaled)
    _run(expected, ref, 6, scaled)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], expected.state[b][key],
                                       atol=1e-6, rtol=1e-5)
        assert float(opt.state[a]["step"]) == float(expected.state[b]["step"]) == 6
        assert opt.state[a]["step"].device == expected.state[b]["step"].device


def test_state_dicts_load_across_implementations():
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    first, ref = _params(), _params()
    opt = adamw.AdamW(_groups(first), **hyper)
    _run(opt, first, 3, scaled=True)
    expected = torch.optim.AdamW(_groups(ref), fused=True, **hyper)
    _run(expected, ref, 3, scaled=True)
    # swap the optimizers' states and go on: both must continue as one
    theirs, ours = expected.state_dict(), opt.state_dict()
    opt.load_state_dict(theirs)
    expected.load_state_dict(ours)
    _run(opt, first, 2, scaled=True)
    _run(expected, ref, 2, scaled=True)
    for a, b in zip(first, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_non_contiguous_parameter_takes_torchs_step():
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    base = torch.randn(16, 32, device="cuda")
    mine = [torch.nn.Parameter(base.t().contiguous().t())]  # strides (1, 16)
    ref = [torch.nn.Parameter(base.clone())]
    assert not mine[0].is_contiguous()
    opt = adamw.AdamW([{"params": mine}], **hyper)
    expected = torch.optim.AdamW([{"params": ref}], fused=True, **hyper)
    for _ in range(3):
        g = torch.randn(16, 32, device="cuda")
        mine[0].grad = g.t().contiguous().t()
        ref[0].grad = g.clone()
        opt.grad_scale = expected.grad_scale = torch.tensor(1.5, device="cuda")
        opt.step()
        expected.step()
    torch.testing.assert_close(mine[0], ref[0], atol=1e-6, rtol=1e-5)


@pytest.fixture
def launched(monkeypatch) -> list[torch.Tensor]:
    """The parameter tensors the Triton kernel is launched on, in order."""
    seen = []
    kernel = adamw._adamw_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(p, *args, **kwargs):
                seen.append(p)
                return kernel[grid](p, *args, **kwargs)
            return launch

    monkeypatch.setattr(adamw, "_adamw_kernel", Counting())
    return seen


def test_only_a_scaled_step_runs_the_kernel(launched):
    """Without a scale torch's fused kernel is the faster one (docs/benchmarks.md), so
    the step is torch's; with one, every parameter goes through the Triton kernel."""
    params = _params()
    opt = adamw.AdamW(_groups(params), lr=1e-3)
    _run(opt, params, 2, scaled=False)
    assert launched == []
    _run(opt, params, 1, scaled=True)
    assert len(launched) == len(params)


def test_sharded_parameters_run_the_kernel_on_their_local_tensors(launched):
    """FSDP2's DTensor parameters (Shard(0), one rank over NCCL): the Triton kernel updates
    their local tensors, as torch's fused AdamW updates the same values as plain tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        mesh = init_device_mesh("cuda", (1,))
        ref = _params()
        mine = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
                for p in ref]
        hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
        opt = adamw.AdamW(_groups(mine), **hyper)
        expected = torch.optim.AdamW(_groups(ref), fused=True, **hyper)
        for i in range(4):
            gen = torch.Generator(device="cuda").manual_seed(100 + i)
            for a, b in zip(mine, ref, strict=True):
                b.grad = torch.randn(b.shape, device="cuda", generator=gen)
                a.grad = DTensor.from_local(b.grad.clone(), mesh, [Shard(0)])
            opt.grad_scale = expected.grad_scale = torch.tensor(2.5 + i, device="cuda")
            opt.step()
            expected.step()
        assert len(launched) == 4 * len(ref)
        assert all(type(p) is torch.Tensor for p in launched)
        for a, b in zip(mine, ref, strict=True):
            torch.testing.assert_close(a.to_local(), b, atol=1e-6, rtol=1e-5)
            assert isinstance(opt.state[a]["exp_avg"], DTensor)
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_torchs_unfused_adamw_goes_on():
    """torch's unfused AdamW keeps its steps on the CPU; loaded into this one (as a resume
    from an older checkpoint does), the steps move to the parameters' GPU and the update
    goes on as torch's would."""
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    first, ref = _params(), _params()
    old = torch.optim.AdamW(_groups(first), foreach=True, **hyper)
    _run(old, first, 3, scaled=False)
    expected = torch.optim.AdamW(_groups(ref), foreach=True, **hyper)
    _run(expected, ref, 3, scaled=False)
    opt = adamw.AdamW(_groups(first), **hyper)
    opt.load_state_dict(old.state_dict())
    # unscaled: torch's unfused step takes no grad_scale; ours then runs torch's fused
    # kernel, which refuses steps on another device than the parameters'
    _run(opt, first, 2, scaled=False)
    _run(expected, ref, 2, scaled=False)
    for a, b in zip(first, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert opt.state[a]["step"].device == a.device


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_bf16_moments_run_the_kernel_and_round_once_per_step(scaled, launched):
    """bf16 moments (training.moments_dtype) take the kernel with or without a scale, and
    follow torch's fused AdamW whose moments are rounded to bf16 after every step."""
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    mine, ref = _params(), _params()
    opt = adamw.AdamW(_groups(mine), moments_dtype=torch.bfloat16, **hyper)
    expected = torch.optim.AdamW(_groups(ref), fused=True, **hyper)
    for i in range(6):
        _run(opt, mine, 1, scaled)
        _run(expected, ref, 1, scaled)
        for state in expected.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].copy_(state[key].to(torch.bfloat16))
        assert len(launched) == (i + 1) * len(mine)
    for a, b in zip(mine, ref, strict=True):
        # the kernel's fp32 moments and torch's can differ in their last bit, and so now
        # and then round to neighbouring bf16 values: a later update then differs by about
        # lr * 2^-8 on those few elements
        assert torch.isclose(a, b, atol=1e-6, rtol=1e-5).float().mean() > 0.999
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[a][key].dtype == torch.bfloat16
            # the same fp32 value rounded; a one-ulp difference where fp32 rounding differs
            torch.testing.assert_close(opt.state[a][key].float(), expected.state[b][key],
                                       atol=1e-6, rtol=8e-3)
