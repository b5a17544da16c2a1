"""Unit-test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own cluster state directories (DSK_STATE_DIR): runs claim the
    state directory of their cluster name for their inventory, and the tests' inventories
    share names ('cluster')."""
    monkeypatch.setenv("DSK_STATE_DIR", str(tmp_path_factory.mktemp("state")))
