import os
import stat

import pytest

from dsk_provision import state
from dsk_provision.errors import InputError


def test_env_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("DSK_STATE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "x"))
    assert state.cluster_state_dir("c") == tmp_path / "s" / "c"


def test_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("DSK_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "x"))
    assert state.cluster_state_dir("c") == tmp_path / "x" / "dsk-provision" / "c"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert state.cluster_state_dir("c") == tmp_path / "h/.local/state/dsk-provision/c"


def test_created_private_whatever_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("DSK_STATE_DIR", str(tmp_path / "s"))
    old = os.umask(0)
    try:
        path = state.cluster_state_dir("c", create=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_names_that_are_not_a_directory(name):
    with pytest.raises(InputError):
        state.cluster_state_dir(name)
