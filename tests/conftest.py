"""Suite-wide fixtures."""

from __future__ import annotations

import sys

import pytest

_SYS_INTERN = sys.intern


@pytest.fixture(autouse=True)
def _restore_sys_intern():
    """Tests that import a role's Ansible module in-process load ansible.module_utils,
    which replaces sys.intern with a wrapper object; torch's compiler, imported lazily by
    later tests in the same process, refuses that wrapper. Put the builtin back."""
    yield
    sys.intern = _SYS_INTERN
