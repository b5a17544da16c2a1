"""SIGTERM and Ctrl-C (SIGINT to the whole process group) during `train` on the sandbox:
the CLI exits 143/130 and nothing of the run is left, on the nodes or on this machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsk_provision import launch
from dsk_provision.inventory import load_inventory
from dsk_provision.remote import SshTransport, run_command

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"
STEP_LINE = re.compile(r"^\[node\d+ rank 0\] .*step \d+/\d+ \| loss", re.MULTILINE)
# Bracketed first letters keep the pattern from matching the shell that runs pgrep.
LEFT_ON_NODE = "pgrep -af '[t]orch[.]distributed[.]run|[t]rainer[.]train'"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


@pytest.mark.parametrize(("signum", "to_group", "code"), [
    (signal.SIGTERM, False, 143),   # kill, a scheduler ending the job
    (signal.SIGINT, True, 130),     # Ctrl-C: the terminal signals the foreground group
], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_to_train_leaves_nothing_running(sandbox_cluster, node_ssh, tmp_path,
                                                  signum, to_group, code):
    config = tmp_path / "long.toml"
    text = TINY.read_text()
    assert "\nsteps = 40\n" in text
    config.write_text(text.replace("\nsteps = 40\n", "\nsteps = 100000\n"))
    runs = tmp_path / "runs"
    output = tmp_path / "train.out"
    exe = Path(sys.prefix) / "bin" / "dsk-provision"
    env = dict(os.environ, DSK_RUNS_DIR=str(runs))
    with open(output, "w") as out:
        cli = subprocess.Popen([str(exe), "train", "-i", str(sandbox_cluster.inventory_path),
                                "--config", str(config)], cwd=REPO, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    clients: list[int] = []
    inventory = load_inventory(sandbox_cluster.inventory_path)
    try:
        deadline = time.monotonic() + 180
        while not STEP_LINE.search(output.read_text()):
            assert cli.poll() is None, f"train ended early:\n{output.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no step within 180 s:\n{output.read_text()}"
            time.sleep(0.2)
        clients = _children(cli.pid)
        assert len(clients) == len(sandbox_cluster.nodes), clients
        if to_group:
            os.killpg(cli.pid, signum)
        else:
            os.kill(cli.pid, signum)
        cli.wait(timeout=120)
        said = output.read_text()
        assert cli.returncode == code, said[-4000:]
        assert (f"interrupted by {signum.name}; stopped trainer.train on "
                "node1, node2, node3") in said
        left = [pid for pid in clients if _alive(pid)]
        assert not left, f"ssh clients of train still run: {left}"
        for name, ip in sandbox_cluster.nodes:
            proc = node_ssh(ip, LEFT_ON_NODE, check=False)
            assert proc.stdout.strip() == "", f"left running on {name}:\n{proc.stdout}"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for pid in clients:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        # Leave the shared sandbox as it was, whatever happened above.
        for run_dir in runs.glob("*-train"):
            for node in inventory.nodes:
                run_command(SshTransport(inventory), node,
                            launch.stop_command(node, run_dir.name, grace_s=5), timeout=60)
