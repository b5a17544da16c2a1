"""`train` on the sandbox checks every node over SSH before torchrun starts: a node whose
Python lacks the trainer's modules is named in seconds, and nothing starts anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"
LEFT_ON_NODE = "pgrep -af '[t]orch[.]distributed[.]run|[t]rainer[.]train'"


def test_a_node_without_the_trainers_modules_is_named_before_torchrun(sandbox_cluster,
                                                                     node_ssh, tmp_path):
    doc = yaml.safe_load(sandbox_cluster.inventory_path.read_text())
    # a cluster of its own name: the sandbox's lock and state are left alone
    doc["all"]["vars"]["dsk_cluster_name"] = f"{sandbox_cluster.name}-preflight"
    node2 = doc["all"]["children"]["nodes"]["hosts"]["node2"]
    node2["dsk_python"] = "/usr/bin/python3"  # the system's Python: no torch, no numpy
    hosts = tmp_path / "inventory" / "hosts.yml"
    hosts.parent.mkdir()
    hosts.write_text(yaml.safe_dump(doc, sort_keys=False))
    runs = tmp_path / "runs"
    exe = Path(sys.prefix) / "bin" / "dsk-provision"
    started = time.monotonic()
    proc = subprocess.run([str(exe), "train", "-i", str(hosts), "--config", str(TINY)],
                          cwd=REPO, env=dict(os.environ, DSK_RUNS_DIR=str(runs)),
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said[-4000:]
    assert "checks before the launch failed on node2:" in said, said[-4000:]
    assert "node2: /usr/bin/python3 cannot import" in said and "No module named 'torch'" in said
    assert "node1:" not in said.split("checks before the launch failed", 1)[1].split("hint")[0]
    assert took < 120, f"the checks took {took:.0f} s"
    assert not list(runs.glob("*-train/logs")), "torchrun was started"
    for name, ip in sandbox_cluster.nodes:
        left = node_ssh(ip, LEFT_ON_NODE, check=False).stdout.strip()
        assert left == "", f"left running on {name}:\n{left}"
