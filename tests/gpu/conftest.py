"""GPU tests: run only where torch sees a CUDA GPU; skipped cleanly elsewhere.

DSK_GPU_OUT (optional): a directory where the tests leave what they measured
(gpu_perf.json, the validate report) for the benchmark record.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_CUDA = _cuda()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU"))


@pytest.fixture
def gpu_out(tmp_path) -> Path:
    out = Path(os.environ.get("DSK_GPU_OUT") or tmp_path / "gpu-out")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def fp8_grouped_gpu() -> None:
    """Skip, saying why, on a GPU that torch's FP8 grouped GEMM does not run on (the
    routed experts' FP8 path, trainer.model.fp8_experts)."""
    import torch

    from trainer.model.fp8_experts import CAPABILITIES

    if torch.cuda.get_device_capability() not in CAPABILITIES:
        pytest.skip(f"{torch.cuda.get_device_name()}: torch's FP8 grouped GEMM needs "
                    f"compute capability {' or '.join(f'{a}.{b}' for a, b in CAPABILITIES)}")
