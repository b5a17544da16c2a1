"""trainer/profiling.py on synthetic profiler events: kernels (overlapping ones merged)
and the GPU's idle gaps between them, by length, the longest named by the step phase
the host was in when each began; device-side copies of host ranges are not kernels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer import profiling

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def event(name, start, end, device=CUDA, annotation=False):
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, end=end),
                           device_time=(end - start))


def test_idle_gaps_by_length_and_phase():
    events = [
        event("dsk.forward", 0, 1000, CPU, annotation=True),
        event("dsk.optimizer", 1000, 4000, CPU, annotation=True),
        event("dsk.forward", 0, 1000, CUDA, annotation=True),  # mirrored range
        event("dsk.optimizer", 1000, 4000, CUDA),  # mirrored, where torch does not say so
        event("Optimizer.step#AdamW.step", 1000, 4000, CUDA),
        event("gemm", 10, 500),
        event("norm", 400, 600),  # overlaps the gemm: no gap between them
        event("silu", 605, 700),  # 5 µs after
        event("attention", 750, 900),  # 50 µs after
        event("adam", 3000, 3100),  # 2.1 ms after: the host in the optimizer phase
        event("adam", 3400, 3500),  # 0.3 ms after
    ]
    gaps = profiling.idle_gaps(events)
    assert gaps["idle_ms"] == pytest.approx((5 + 50 + 2100 + 300) / 1e3)
    by = gaps["by_length"]
    assert by["under 10 µs"] == {"ms": pytest.approx(0.005), "count": 1}
    assert by["10-100 µs"] == {"ms": pytest.approx(0.05), "count": 1}
    assert by["0.1-1 ms"] == {"ms": pytest.approx(0.3), "count": 1}
    assert by["over 1 ms"] == {"ms": pytest.approx(2.1), "count": 1}
    assert gaps["largest"][:2] == [{"ms": pytest.approx(2.1), "phase": "dsk.forward"},
                                   {"ms": pytest.approx(0.3), "phase": "dsk.optimizer"}]
    line = profiling.describe_gaps(gaps)
    assert line.startswith("GPU idle 2.5 ms per step: 0.0 ms in 1 gaps under 10 µs")
    assert "largest: 2.10 ms (dsk.forward), 0.30 ms (dsk.optimizer)" in line
    # the annotations' device copies are not kernels in the kernel table either
    prof = SimpleNamespace(events=lambda: events)
    kernels, _families, busy = profiling.kernel_times(prof)
    assert set(kernels) == {"gemm", "norm", "silu", "attention", "adam"}
    assert busy == pytest.approx((490 + 200 + 95 + 150 + 200) / 1e3)


def test_per_step_figures_and_a_gap_outside_every_phase():
    events = [event("k", 0, 100), event("k", 300, 400), event("k", 1400, 1500),
              event("dsk.backward", 250, 350, CPU)]
    gaps = profiling.idle_gaps(events, steps=2)
    assert gaps["idle_ms"] == pytest.approx(1.2 / 2)
    # a 0.2 ms gap and a 1 ms one over two steps
    assert gaps["by_length"]["0.1-1 ms"] == {"ms": pytest.approx(0.1), "count": 0.5}
    assert gaps["by_length"]["over 1 ms"] == {"ms": pytest.approx(0.5), "count": 0.5}
    assert [g["phase"] for g in gaps["largest"]] == ["-", "-"]  # neither began in a phase
    assert profiling.idle_gaps([])["idle_ms"] == 0
    assert profiling.describe_gaps(profiling.idle_gaps([])) == "GPU idle 0.0 ms per step: no gaps"
