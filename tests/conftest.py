"""Suite-wide fixtures."""

from __future__ import annotations

import sys

import pytest

from dsk_provision.state import STATE_DIR_ENV

_SYS_INTERN = sys.intern


@pytest.fixture(autouse=True)
def _restore_sys_intern():
    """Tests that import a role's Ansible module in-process load ansible.module_utils,
    which replaces sys.intern with a wrapper object; torch's compiler, imported lazily by
    later tests in the same process, refuses that wrapper. Put the builtin back."""
    yield
    sys.intern = _SYS_INTERN


@pytest.fixture(autouse=True, scope="session")
def _state_dir(tmp_path_factory):
    """Per-cluster state (the cluster key, the run lock) goes to one temporary directory
    for the whole session, never to the home of whoever runs the tests. Set in the
    environment, so the commands the tests start see it too."""
    patch = pytest.MonkeyPatch()
    patch.setenv(STATE_DIR_ENV, str(tmp_path_factory.mktemp("dsk-state")))
    yield
    patch.undo()
