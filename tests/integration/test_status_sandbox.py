"""`status` on the shared bootstrapped sandbox, with node3 stopped and a drift made on
node2: node3 shows unreachable within the probe's timeout and the others answer; the
drift column lists what a bootstrap would change on node2 and nothing on node1. node3 is
started again and node2's file put back, however the test ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VICTIM = "node3"
DRIFTED = "node2"
KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
RESTARTED_FILES = ("/etc/hosts", "/root/.ssh/authorized_keys")


def _status(inventory: Path, runs: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, DSK_RUNS_DIR=str(runs))
    clock = time.monotonic()
    proc = subprocess.run([str(Path(sys.prefix) / "bin" / "dsk-provision"), "status", "-i",
                           str(inventory), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, time.monotonic() - clock


@pytest.fixture
def cluster(bootstrapped_cluster):
    bootstrapped_cluster.require_success()
    return bootstrapped_cluster.info


def test_status_names_a_stopped_node_and_the_drift_of_another(cluster, node_ssh, tmp_path):
    from dsk_provision import sandbox

    info = cluster
    ips = dict(info.nodes)
    proc, took = _status(info.inventory_path, tmp_path / "runs", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["reachable"] == 3 and data["drift_checked"] is False
    for row in data["nodes"]:
        assert row["reachable"] and row["error"] is None, row
        assert row["gpus"] == 0 and row["cordoned"] is None and row["validation"] is None
    print(f"status, 3 nodes answering: {took:.1f} s")

    def node_running() -> bool:
        rows = sandbox.status(info.name)
        return any(n["name"] == VICTIM and n["state"] == "running" for n in rows[0]["nodes"])

    # A restarted sandbox node gets the sandbox's /etc/hosts and authorized_keys back:
    # the victim's own are kept here and put back after its restart.
    kept = {path: node_ssh(ips[VICTIM], f"base64 -w0 {path}").stdout.strip()
            for path in RESTARTED_FILES}
    backup = f"{KNOWN_HOSTS}.status-test"
    node_ssh(ips[DRIFTED], f"cp -p {KNOWN_HOSTS} {backup} && sed -i '/^{VICTIM}[ ,]/d' "
                          f"{KNOWN_HOSTS}")
    try:
        sandbox.stop_node(info.name, VICTIM)
        proc, took = _status(info.inventory_path, tmp_path / "runs", "--json", "--drift",
                             "--timeout", "5")
    finally:
        node_ssh(ips[DRIFTED], f"mv {backup} {KNOWN_HOSTS}")
        if not node_running():
            sandbox.up(info.name, len(info.nodes))
        for path, text in kept.items():
            node_ssh(ips[VICTIM], f"echo {text} | base64 -d > {path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    rows = {r["name"]: r for r in data["nodes"]}
    assert data["reachable"] == 2 and data["drift_checked"] is True
    victim = rows[VICTIM]
    assert not victim["reachable"] and victim["error"], victim
    assert victim["probe_s"] < 5 + 2, victim  # its timeout, not the run's
    assert victim["drift"] is None
    assert rows["node1"]["drift"] == [], rows["node1"]
    assert any("pin every node's host keys" in task for task in rows[DRIFTED]["drift"]), \
        rows[DRIFTED]
    print(f"status --drift with {VICTIM} stopped: {took:.1f} s")

    # Back as it was: node3 answers again.
    proc, _took = _status(info.inventory_path, tmp_path / "runs", "--json")
    assert json.loads(proc.stdout)["reachable"] == 3
