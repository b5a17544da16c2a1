"""Unit-test fixtures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank():
    """A process group of one rank (gloo, in memory) for the test's duration."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def fake_nccl(tmp_path_factory) -> str:
    """The path of a stand-in libnccl.so.2 built from fixtures/fake_nccl.c: NCCL's C
    signatures, one rank, all-reduce as a host memory copy (see the source)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed (scripts/setup-host.sh installs gcc)"
    out = tmp_path_factory.mktemp("fake_nccl") / "libfake_nccl.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(out),
                    str(Path(__file__).parent / "fixtures" / "fake_nccl.c")],
                   check=True, capture_output=True, text=True)
    return str(out)


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own cluster state directories (DSK_STATE_DIR): runs claim the
    state directory of their cluster name for their inventory, and the tests' inventories
    share names ('cluster')."""
    monkeypatch.setenv("DSK_STATE_DIR", str(tmp_path_factory.mktemp("state")))
