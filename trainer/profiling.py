"""Where a step's accelerator time goes: torch.profiler around one training step, its
kernels grouped into families (GEMM, attention, elementwise, reductions, copies, ...).

Used by the trainer (``--profile-step N``) and by the one-GPU development benchmark
trainer/bench/step_profile.py.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

FAMILIES = [  # first match wins; matched against the kernel's name, lower case
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(fprop|bprop)|mha"),
    ("grouped gemm", r"grouped|group_gemm|ragged"),
    ("gemm", r"gemm|sm90_xmma|cutlass|cublas|nvjet|matmul|splitk"),
    ("adam", r"adam|foreach|multi_tensor"),
    ("index/sort/scatter", r"index|scatter|gather|sort|radix|bincount|histogram|cumsum|scan"),
    ("reduction", r"reduce|norm|softmax|cross_entropy|nll|logsumexp|sum_"),
    ("copy/cast", r"copy|cast|convert|memcpy|memset|fill|cat"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton|silu|mul|add"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def kernel_times(prof, steps: int = 1) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """From a finished torch.profiler run over ``steps`` steps: per kernel [ms, calls] per
    step, ms per step by family, and the total kernel ms per step. Profiler annotations
    (user ranges such as ``Optimizer.step#AdamW.step``) are not kernels and are left out."""
    import torch

    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA or "#" in evt.name:
            continue
        k = kernels[evt.name]
        k[0] += evt.device_time / 1e3 / steps
        k[1] += 1 / steps
    by_family: dict[str, float] = defaultdict(float)
    for name, (ms, _n) in kernels.items():
        by_family[family(name)] += ms
    return dict(kernels), dict(by_family), sum(v[0] for v in kernels.values())


def start_profiler(device_type: str):
    """A started torch.profiler over the CPU and, on GPU, CUDA."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device_type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def profile_report(prof, step: int, elapsed: float, out_dir: Path, rank: int) -> None:
    """Write step ``step``'s trace and, on rank 0, print its kernel time by family."""
    trace_dir = out_dir / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_dir / f"step-{step}-rank-{rank}.json"))
    if rank != 0:
        return
    _kernels, by_family, busy_ms = kernel_times(prof)
    if not by_family:  # no accelerator kernels (CPU)
        print(f"profile of step {step}: {elapsed * 1e3:.1f} ms | trace in {trace_dir}",
              flush=True)
        return
    families = ", ".join(f"{name} {ms:.1f}" for name, ms in
                         sorted(by_family.items(), key=lambda kv: -kv[1]) if ms >= 0.05)
    print(f"profile of step {step}: {elapsed * 1e3:.1f} ms, kernels {busy_ms:.1f} ms "
          f"({100 * busy_ms / (elapsed * 1e3):.0f}%) | ms by family: {families} | "
          f"trace in {trace_dir}", flush=True)
