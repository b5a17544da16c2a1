"""Unit-test fixtures."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank():
    """A process group of one rank (gloo, in memory) for the test's duration."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own cluster state directories (DSK_STATE_DIR): runs claim the
    state directory of their cluster name for their inventory, and the tests' inventories
    share names ('cluster')."""
    monkeypatch.setenv("DSK_STATE_DIR", str(tmp_path_factory.mktemp("state")))
