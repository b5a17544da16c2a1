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
