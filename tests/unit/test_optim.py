"""The optimizer the trainer builds: AdamW with weight decay on matrices only, the
warmup-then-cosine schedule, and trainer/adamw.py's AdamW where the fused kernel applies
(its Triton update is compared to torch's on the GPU: tests/gpu/test_gpu_adamw.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from trainer import adamw
from trainer.config import load_config
from trainer.model import Transformer
from trainer.optim import build_optimizer, lr_factor

ROOT = Path(__file__).resolve().parents[2]


def test_lr_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_the_model_gets_the_fused_adamw_with_decay_on_matrices_only():
    cfg = load_config(ROOT / "trainer" / "configs" / "tiny.toml")
    model = Transformer(cfg.model)
    opt, _ = build_optimizer(model, cfg)
    assert type(opt) is adamw.AdamW and opt.defaults["fused"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.training.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])


def test_where_the_kernel_cannot_run_torchs_fused_step_runs():
    """On the CPU (no Triton kernel there) trainer.adamw.AdamW is torch's fused AdamW,
    grad_scale included, to the bit."""
    torch.manual_seed(0)
    base = [torch.randn(5, 7), torch.randn(11)]
    mine = [torch.nn.Parameter(t.clone()) for t in base]
    ref = [torch.nn.Parameter(t.clone()) for t in base]
    opt = adamw.AdamW([{"params": mine, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    expected = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], lr=1e-2,
                                 betas=(0.9, 0.95), fused=True)
    assert opt.defaults["fused"]
    for i in range(3):
        for a, b in zip(mine, ref, strict=True):
            a.grad = torch.full_like(a, 0.5 * (i + 1))
            b.grad = a.grad.clone()
        for o in (opt, expected):
            o.grad_scale = torch.tensor(2.0 + i)
            o.step()
    for a, b in zip(mine, ref, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], expected.state[b]["exp_avg_sq"])


def test_adamw_benchmark_imports_and_says_when_there_is_no_gpu():
    """bench/adamw.py (the AdamW timings in docs/benchmarks.md) runs only on a GPU; here
    its imports from the trainer and bench.fp8_kernels must still resolve."""
    import os
    import subprocess
    import sys

    # any GPU of this machine hidden from the script, which would otherwise measure
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "adamw.py"), "--config", "tiny"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout


def test_the_host_time_benchmark_times_all_three_steps(tmp_path):
    """bench/optimizer_host.py (docs/benchmarks.md) on tiny.toml: FSDP2 makes every
    parameter a DTensor, and each variant of clip + step runs."""
    import json
    import subprocess
    import sys

    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "optimizer_host.py"), "--config",
                           str(ROOT / "trainer" / "configs" / "tiny.toml"), "--steps", "2",
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["ms"]) == ["torch", "torch fused", "trainer"]
    assert all(ms > 0 for ms in result["ms"].values())
    assert result["tensors"] == len(list(Transformer(
        load_config(ROOT / "trainer" / "configs" / "tiny.toml").model).parameters()))


def _sharded_pairs(one_rank_mesh, placements):
    """Parameters as DTensors of ``placements`` on a one-rank mesh, and the same values as
    plain tensors."""
    from torch.distributed.tensor import distribute_tensor

    torch.manual_seed(0)
    base = [torch.randn(6, 5), torch.randn(9), torch.randn(3, 4, 2)]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), one_rank_mesh, placements))
               for t in base]
    plain = [torch.nn.Parameter(t.clone()) for t in base]
    return sharded, plain


@pytest.fixture
def cpu_mesh(one_rank):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,))


def test_sharded_parameters_update_through_their_local_tensors(cpu_mesh):
    """DTensor parameters (FSDP2's Shard(0)) take the same update as plain ones, to the bit,
    grad_scale included; the moments stay DTensors of the parameter's layout, and after
    the first step (which makes them) no DTensor operation runs in a step."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.utils._python_dispatch import TorchDispatchMode

    sharded, plain = _sharded_pairs(cpu_mesh, [Shard(0)])
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt, ref = adamw.AdamW(sharded, **hyper), adamw.AdamW(plain, **hyper)
    for i in range(3):
        for a, b in zip(sharded, plain, strict=True):
            b.grad = torch.randn(b.shape) * (i + 1)
            a.grad = DTensor.from_local(b.grad.clone(), cpu_mesh, a.placements)
        opt.grad_scale = ref.grad_scale = torch.tensor(2.0 + i)
        ref.step()

        class NoDTensorOps(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                assert DTensor not in types, func
                return func(*args, **(kwargs or {}))

        if i == 0:
            opt.step()
            continue
        with NoDTensorOps():
            opt.step()
    for a, b in zip(sharded, plain, strict=True):
        assert torch.equal(a.to_local(), b)
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[a][key]
            assert isinstance(state, DTensor) and state.placements == a.placements
            assert torch.equal(state.to_local(), ref.state[b][key])
        assert float(opt.state[a]["step"]) == 3


def test_a_partial_gradient_is_reduced_then_updated_locally(cpu_mesh):
    """A replicated parameter's gradient that is still a partial sum (tp) is redistributed
    to the parameter's layout, then updated through the local tensors like any other."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    sharded, plain = _sharded_pairs(cpu_mesh, [Replicate()])
    opt, ref = adamw.AdamW(sharded, lr=1e-2), adamw.AdamW(plain, lr=1e-2)
    fallback = []
    opt._torch_step = lambda *args: fallback.append(args)
    for i in range(2):
        for a, b in zip(sharded, plain, strict=True):
            b.grad = torch.randn(b.shape)
            a.grad = DTensor.from_local(b.grad.clone(), cpu_mesh, [Partial()])
        opt.grad_scale = ref.grad_scale = torch.tensor(4.0 + i)
        assert not adamw._localizable(sharded[0])
        opt.step()
        ref.step()
        assert all(a.grad.placements == (Replicate(),) for a in sharded)
    assert fallback == []
    for a, b in zip(sharded, plain, strict=True):
        assert torch.equal(a.to_local(), b)


def test_amsgrad_takes_torchs_step_with_the_scale_applied_first(cpu_mesh):
    """What the local update does not cover (here amsgrad, on DTensors) goes to torch's
    own step: the gradients divided by the scale first, the scale kept for the next clip
    to replace; the same parameters as torch's fused AdamW on plain tensors."""
    from torch.distributed.tensor import DTensor, Shard

    sharded, plain = _sharded_pairs(cpu_mesh, [Shard(0)])
    opt = adamw.AdamW(sharded, lr=1e-2, amsgrad=True)
    ref = torch.optim.AdamW(plain, lr=1e-2, amsgrad=True, fused=True)
    for i in range(3):
        for a, b in zip(sharded, plain, strict=True):
            b.grad = torch.randn(b.shape) * (i + 1)
            a.grad = DTensor.from_local(b.grad.clone(), cpu_mesh, [Shard(0)])
        scale = torch.tensor(2.0 + i)
        opt.grad_scale, ref.grad_scale = scale, scale.clone()
        opt.step()
        ref.step()
        assert opt.grad_scale is scale
    for a, b in zip(sharded, plain, strict=True):
        torch.testing.assert_close(a.to_local(), b, rtol=1e-6, atol=1e-7)
        assert "max_exp_avg_sq" in opt.state[a]


# ---- training.moments_dtype = "bfloat16": both moments kept in bf16 ----


def _round_moments(opt) -> None:
    """What bf16 moments are, emulated on an fp32 optimizer: each moment rounded to bf16
    once it is stored."""
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].copy_(state[key].to(torch.bfloat16))


def _scales(i):
    return None if i == 1 else torch.tensor(2.0 + i)  # one step without a scale


def test_bf16_moments_are_the_fp32_update_rounded_once_per_step():
    """On the CPU (torch's fused kernel on fp32 copies of the moments) bf16 moments equal
    torch's fused AdamW whose moments are rounded to bf16 after every step, to the bit,
    with and without a scale; they are bf16 tensors, half the state."""
    torch.manual_seed(0)
    base = [torch.randn(5, 7), torch.randn(11)]
    mine = [torch.nn.Parameter(t.clone()) for t in base]
    ref = [torch.nn.Parameter(t.clone()) for t in base]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt = adamw.AdamW(mine, moments_dtype=torch.bfloat16, **hyper)
    expected = torch.optim.AdamW(ref, fused=True, **hyper)
    for i in range(4):
        for a, b in zip(mine, ref, strict=True):
            a.grad = torch.randn(a.shape) * (i + 1)
            b.grad = a.grad.clone()
        for o in (opt, expected):
            o.grad_scale = _scales(i)
            o.step()
        _round_moments(expected)
    for a, b in zip(mine, ref, strict=True):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[a][key].dtype == torch.bfloat16
            assert torch.equal(opt.state[a][key].float(), expected.state[b][key])
    # not what fp32 moments give: the rounding is real
    fp32 = [torch.nn.Parameter(t.clone()) for t in base]
    plain = adamw.AdamW(fp32, **hyper)
    torch.manual_seed(0)
    for i in range(4):
        for a, b in zip(fp32, mine, strict=True):
            a.grad = b.grad.clone()
        plain.grad_scale = _scales(i)
        plain.step()
    assert not torch.equal(plain.state[fp32[0]]["exp_avg"].to(torch.bfloat16).float(),
                           plain.state[fp32[0]]["exp_avg"])


def test_bf16_moments_on_sharded_parameters_and_through_torchs_step(cpu_mesh):
    """DTensor parameters keep bf16 moments of their layout through the local update, and
    amsgrad (torch's own step) widens them for its step and rounds them back; both follow
    the same run on plain tensors with the moments rounded after each step."""
    from torch.distributed.tensor import DTensor, Shard

    for amsgrad in (False, True):
        sharded, plain = _sharded_pairs(cpu_mesh, [Shard(0)])
        hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=amsgrad)
        opt = adamw.AdamW(sharded, moments_dtype=torch.bfloat16, **hyper)
        ref = torch.optim.AdamW(plain, fused=True, **hyper)
        for i in range(3):
            for a, b in zip(sharded, plain, strict=True):
                b.grad = torch.randn(b.shape) * (i + 1)
                a.grad = DTensor.from_local(b.grad.clone(), cpu_mesh, [Shard(0)])
            opt.grad_scale, ref.grad_scale = _scales(i), _scales(i)
            opt.step()
            ref.step()
            _round_moments(ref)
        for a, b in zip(sharded, plain, strict=True):
            torch.testing.assert_close(a.to_local(), b, rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                state = opt.state[a][key]
                assert isinstance(state, DTensor) and state.placements == a.placements
                assert state.dtype == torch.bfloat16, (amsgrad, key)
                torch.testing.assert_close(state.to_local().float(), ref.state[b][key],
                                           rtol=1e-2, atol=1e-6)


def test_a_checkpoints_moments_are_held_in_the_configured_dtype_once_loaded():
    """torch's load_state_dict casts the moments to the parameter's dtype (fp32); they are
    bf16 again before any step (no fp32 copy lives into the next step's peak), and a
    checkpoint of either dtype loads into a run of either."""
    torch.manual_seed(0)
    base = [torch.randn(5, 7), torch.randn(11)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95))

    def run(dtype, params, state=None):
        opt = adamw.AdamW(params, moments_dtype=dtype, **hyper)
        if state is not None:
            opt.load_state_dict(state)
            assert all(opt.state[p][key].dtype == dtype for p in params
                       for key in ("exp_avg", "exp_avg_sq"))
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return opt

    for saved_dtype in (torch.float32, torch.bfloat16):
        first = [torch.nn.Parameter(t.clone()) for t in base]
        saved = run(saved_dtype, first).state_dict()
        for dtype in (torch.bfloat16, torch.float32):
            params = [torch.nn.Parameter(t.clone()) for t in first]
            opt = run(dtype, params, copy.deepcopy(saved))  # torch's load shares "step"
            assert all(opt.state[p][key].dtype == dtype for p in params
                       for key in ("exp_avg", "exp_avg_sq"))
            assert float(opt.state[params[0]]["step"]) == 2


def test_the_config_picks_the_moments_dtype_and_names_the_field_when_wrong():
    from helpers import tiny_doc

    from trainer.config import InputError, parse_config

    cfg = load_config(ROOT / "trainer" / "configs" / "tiny.toml")
    assert build_optimizer(Transformer(cfg.model), cfg)[0].moments_dtype == torch.float32
    cfg.training.moments_dtype = "bfloat16"
    assert build_optimizer(Transformer(cfg.model), cfg)[0].moments_dtype == torch.bfloat16
    assert parse_config(tiny_doc(training={"moments_dtype": "bfloat16"})).training \
        .moments_dtype == "bfloat16"
    with pytest.raises(InputError) as err:
        parse_config(tiny_doc(training={"moments_dtype": "float16"}), "cfg.toml")
    assert err.value.field == "training.moments_dtype" and "cfg.toml" in str(err.value)
