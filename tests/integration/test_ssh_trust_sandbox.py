"""The cluster key and the pinned host keys on the shared sandbox.

Both tests copy the sandbox's inventory to a new place and give it a state directory of
its own (DSK_STATE_DIR), so that it is a second inventory of the same nodes:

- `bootstrap --check --tags ssh_trust` from it, before it ever ran (no state directory,
  no key), must work, report changes and change nothing, on the control node or on the
  nodes;
- a run of ssh_trust in which node3 cannot be reached (its ssh user does not exist) must
  leave node3's entry in the other nodes' /etc/ssh/ssh_known_hosts. That state directory
  starts with the shared cluster's key and recorded host keys, so the run installs
  nothing new; the nodes' known_hosts are put back whatever happens.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
WATCHED = (KNOWN_HOSTS, "/root/.ssh/authorized_keys", "/root/.ssh/config",
           "/root/.ssh/id_ed25519_dsk")


def _copy_inventory(info, directory: Path, **host_vars: dict) -> Path:
    doc = yaml.safe_load(Path(info.inventory_path).read_text())
    for host, values in host_vars.items():
        doc["all"]["children"]["nodes"]["hosts"][host].update(values)
    directory.mkdir(parents=True)
    (directory / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return directory / "hosts.yml"


def _dsk(args: list[str], state_dir: Path, runs: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DSK_STATE_DIR=str(state_dir), DSK_RUNS_DIR=str(runs))
    return subprocess.run([str(Path(sys.prefix) / "bin" / "dsk-provision"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def _recap(runs: Path) -> dict:
    (recap,) = runs.glob("*/recap.json")
    return json.loads(recap.read_text())


def _digests(node_ssh, ip: str) -> dict[str, str]:
    out = node_ssh(ip, "sha256sum " + " ".join(WATCHED)).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def test_check_mode_from_a_fresh_inventory_changes_nothing(bootstrapped_cluster, node_ssh,
                                                           tmp_path):
    bootstrapped_cluster.require_success()
    info = bootstrapped_cluster.info
    inventory = _copy_inventory(info, tmp_path / "inv")
    before = {ip: _digests(node_ssh, ip) for _name, ip in info.nodes}

    # ssh_trust alone: the one concern that depends on what the control node holds (the
    # whole site in check mode takes minutes more).
    proc = _dsk(["bootstrap", "--check", "--tags", "ssh_trust", "-i", str(inventory)],
                tmp_path / "state", tmp_path / "runs")

    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "check mode: no cluster key in" in out
    recap = _recap(tmp_path / "runs")
    assert recap["check"] is True
    # The key that would be installed is a change on every node.
    assert all(recap["recap"][name]["changed"] > 0 for name, _ip in info.nodes), recap
    assert not (tmp_path / "state").exists()
    assert not (inventory.parent / ".ssh_trust").exists()
    assert {ip: _digests(node_ssh, ip) for _name, ip in info.nodes} == before


def test_an_unreachable_node_keeps_its_pinned_host_keys(bootstrapped_cluster, node_ssh,
                                                       tmp_path):
    from dsk_provision.inventory import load_inventory
    from dsk_provision.trust import key_dir

    bootstrapped_cluster.require_success()
    info = bootstrapped_cluster.info
    (node1, ip1), (node2, ip2), (node3, ip3) = info.nodes
    shared = key_dir(load_inventory(info.inventory_path))
    inventory = _copy_inventory(info, tmp_path / "inv", **{node3: {"ansible_user": "nobody-dsk"}})
    state_dir = tmp_path / "state" / load_inventory(inventory).cluster_name
    state_dir.mkdir(parents=True, mode=0o700)
    for name in ("id_ed25519", "id_ed25519.pub", "host_keys.json"):
        shutil.copy2(shared / name, state_dir / name)
    assert node3 in json.loads((state_dir / "host_keys.json").read_text())
    saved = {ip: node_ssh(ip, f"cat {KNOWN_HOSTS}").stdout for ip in (ip1, ip2)}
    assert any(line.startswith(f"{node3},{ip3} ") for line in saved[ip1].splitlines())

    try:
        proc = _dsk(["bootstrap", "--tags", "ssh_trust", "-i", str(inventory)],
                    tmp_path / "state", tmp_path / "runs")
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-6000:]
        recap = _recap(tmp_path / "runs")
        assert list(recap["unreachable"]) == [node3], recap
        assert recap["failed"] == {}, recap
        for name in (node1, node2):
            assert recap["recap"][name]["changed"] == 0, recap
        for ip in (ip1, ip2):
            assert node_ssh(ip, f"cat {KNOWN_HOSTS}").stdout == saved[ip]
        record = json.loads((state_dir / "host_keys.json").read_text())
        assert record == json.loads((shared / "host_keys.json").read_text())
    finally:
        for ip, text in saved.items():
            node_ssh(ip, f"printf %s {shlex.quote(text)} > {KNOWN_HOSTS}.dsk-test && "
                         f"mv {KNOWN_HOSTS}.dsk-test {KNOWN_HOSTS}")
