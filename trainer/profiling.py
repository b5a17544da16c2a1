"""Where a step's accelerator time goes: torch.profiler around one training step, its
kernels grouped into families (GEMM, attention, elementwise, reductions, copies, ...),
and where the accelerator sat idle between kernels: the gaps by length, and the step
phase (``dsk.forward``, ``dsk.backward``, ... ranges, trainer/step.py) each of the
longest began in.

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


# the step's phases, as torch.profiler ranges (trainer/step.py): the host work each GPU
# idle gap falls in is named by them
PHASE = "dsk."
# GPU idle gaps by length, in µs: the short ones are the GPU's own pause between kernels
# queued back to back; the long ones are the GPU waiting for the host
GAP_BUCKETS = (("under 10 µs", 10.0), ("10-100 µs", 100.0), ("0.1-1 ms", 1000.0),
               ("over 1 ms", float("inf")))


def _is_kernel(evt) -> bool:
    """A device event that is a kernel (or copy), not a user range mirrored on the device
    (``record_function`` ranges, ``Optimizer.step#AdamW.step``)."""
    import torch

    return (evt.device_type == torch.autograd.DeviceType.CUDA and "#" not in evt.name
            and not evt.name.startswith(PHASE)
            and not getattr(evt, "is_user_annotation", False))


def kernel_times(prof, steps: int = 1) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """From a finished torch.profiler run over ``steps`` steps: per kernel [ms, calls] per
    step, ms per step by family, and the total kernel ms per step. Profiler annotations
    (user ranges such as ``Optimizer.step#AdamW.step``) are not kernels and are left out."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if not _is_kernel(evt):
            continue
        k = kernels[evt.name]
        k[0] += evt.device_time / 1e3 / steps
        k[1] += 1 / steps
    by_family: dict[str, float] = defaultdict(float)
    for name, (ms, _n) in kernels.items():
        by_family[family(name)] += ms
    return dict(kernels), dict(by_family), sum(v[0] for v in kernels.values())


def idle_gaps(events, steps: int = 1, largest: int = 8) -> dict:
    """Where the GPU sat idle between its first and last kernel: the gaps between kernels
    (overlapping kernels merged), their total and count per step by length
    (GAP_BUCKETS), and the ``largest`` gaps, each with the step phase (a ``dsk.`` range on
    the host) it began in, or "-" outside every phase. ``events``: a finished
    torch.profiler run's events (``prof.events()``); times in ms."""
    import torch

    spans = sorted((e.time_range.start, e.time_range.end) for e in events if _is_kernel(e))
    busy: list[list[float]] = []
    for start, end in spans:
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    gaps = [(a[1], b[0] - a[1]) for a, b in zip(busy, busy[1:], strict=False)]
    phases = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.name.startswith(PHASE)
                    and e.device_type == torch.autograd.DeviceType.CPU)

    def phase_at(t: float) -> str:
        inner = [(start, name) for start, end, name in phases if start <= t < end]
        return max(inner)[1] if inner else "-"  # the innermost: the latest to begin

    buckets = {name: [0.0, 0.0] for name, _ in GAP_BUCKETS}
    for _start, us in gaps:
        name = next(n for n, limit in GAP_BUCKETS if us < limit)
        buckets[name][0] += us / 1e3 / steps
        buckets[name][1] += 1 / steps
    top = sorted(gaps, key=lambda g: -g[1])[:largest]
    return {"idle_ms": sum(us for _s, us in gaps) / 1e3 / steps,
            "by_length": {n: {"ms": ms, "count": c} for n, (ms, c) in buckets.items()},
            "largest": [{"ms": us / 1e3, "phase": phase_at(start)} for start, us in top]}


def describe_gaps(gaps: dict) -> str:
    """One line: the idle time per step, by length, and the largest gaps' phases."""
    lengths = ", ".join(f"{v['ms']:.1f} ms in {v['count']:.0f} gaps {n}"
                        for n, v in gaps["by_length"].items() if v["count"])
    top = ", ".join(f"{g['ms']:.2f} ms ({g['phase']})" for g in gaps["largest"][:5])
    return (f"GPU idle {gaps['idle_ms']:.1f} ms per step: {lengths or 'no gaps'}"
            + (f"; largest: {top}" if top else ""))


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
          f"{describe_gaps(idle_gaps(prof.events()))} | trace in {trace_dir}", flush=True)
