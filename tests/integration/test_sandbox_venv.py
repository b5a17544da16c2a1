"""`sandbox up` on a running sandbox whose virtualenv was deleted and made again in the
same place restarts the nodes that still see the old one, and says so.

It needs a virtualenv of its own, so it runs a small sandbox of its own (a few seconds
with the cached image), named after the session's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _make_venv(path: Path, marker: str) -> None:
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(path)], check=True)
    (path / marker).write_text("")


def test_up_restarts_nodes_that_see_a_deleted_venv(tmp_path, ssh_argv, sandbox_name):
    from dsk_provision import sandbox

    name = sandbox_name[:7] + ("v" if sandbox_name[:7] + "v" != sandbox_name else "w")
    venv = tmp_path / ".venv"
    _make_venv(venv, "first")
    try:
        sandbox.down(name)
        info = sandbox.up(name, 2, venv=venv)

        def sees(ip: str, marker: str) -> bool:
            proc = subprocess.run(ssh_argv(info, ip, f"test -e /opt/dsk/venv/{marker}"),
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode in (0, 1), proc.stderr
            return proc.returncode == 0

        assert all(sees(ip, "first") for _, ip in info.nodes)
        shutil.rmtree(venv)
        _make_venv(venv, "second")  # a fresh clone in the same path
        said: list[str] = []
        info = sandbox.up(name, 2, venv=venv, progress=said.append)
        assert any("node1, node2 still see" in line and "restarting them" in line
                   for line in said), said
        for node, ip in info.nodes:
            assert sees(ip, "second"), f"{node} still sees the deleted virtualenv"
        said.clear()
        sandbox.up(name, 2, venv=venv, progress=said.append)
        assert not any("restarting" in line for line in said), said  # nothing to do now
    finally:
        sandbox.down(name)
