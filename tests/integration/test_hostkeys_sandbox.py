"""First contact with real nodes: `hostkeys scan` against the shared sandbox.

Every test works on a copy of the sandbox's inventory whose known_hosts file is the
test's own (in tmp_path): the sandbox's inventory and pinned keys stay as they were.
A node whose host key changed is a recorded key that differs from what the node offers
now, made here by recording another key for it (the node itself is left alone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dsk_provision.cli import app
from dsk_provision.hostkeys import HostKey

REPO = Path(__file__).resolve().parents[2]
EXE = Path(sys.prefix) / "bin" / "dsk-provision"


def inventory_copy(info, tmp_path: Path, known_hosts: Path) -> Path:
    """The sandbox's inventory with ``known_hosts`` as its UserKnownHostsFile."""
    doc = yaml.safe_load(Path(info.inventory_path).read_text())
    common = doc["all"]["vars"]["ansible_ssh_common_args"]
    theirs = str(info.state_dir / "ssh/known_hosts")
    assert theirs in common
    doc["all"]["vars"]["ansible_ssh_common_args"] = common.replace(theirs, str(known_hosts))
    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return inv


def pinned_keys(info) -> dict[str, HostKey]:
    """Each node's key as the sandbox pinned it when it made the node."""
    out = {}
    for line in (info.state_dir / "ssh/known_hosts").read_text().splitlines():
        names, key_type, blob = line.split()[:3]
        out[names.split(",")[0]] = HostKey.parse(key_type, blob)
    return out


def scan(inv: Path, *args: str, answer: str = "") -> subprocess.CompletedProcess:
    # The copy is another inventory of the same cluster name: it gets a state directory of
    # its own, since the sandbox's (once bootstrapped) belongs to the sandbox's inventory.
    env = dict(os.environ, DSK_STATE_DIR=str(inv.parent / "state"))
    return subprocess.run([str(EXE), "hostkeys", "scan", "-i", str(inv), *args], cwd=REPO,
                          env=env, input=answer, capture_output=True, text=True, timeout=120)


def test_confirmed_keys_are_written_and_let_ssh_in(sandbox_cluster, ssh_argv, tmp_path):
    """(A declined prompt and a second scan are covered by tests/unit/test_hostkeys.py.)"""
    known = tmp_path / "known_hosts"
    inv = inventory_copy(sandbox_cluster, tmp_path, known)
    pinned = pinned_keys(sandbox_cluster)
    done = scan(inv, answer="y\n")
    assert done.returncode == 0, done.stdout + done.stderr
    text = known.read_text()
    for node, ip in sandbox_cluster.nodes:
        assert pinned[node].fingerprint_line(f"{node},{ip}") in done.stdout
        assert f"{node},{ip} {pinned[node].line}" in text
        proc = subprocess.run(ssh_argv(sandbox_cluster, ip, "hostname", known_hosts=known),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == node, proc.stderr


def test_a_mismatching_expected_fingerprint_is_refused(sandbox_cluster, tmp_path):
    known = tmp_path / "known_hosts"
    inv = inventory_copy(sandbox_cluster, tmp_path, known)
    pinned = pinned_keys(sandbox_cluster)
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f",
                    str(tmp_path / "other")], check=True)
    other = HostKey.parse(*(tmp_path / "other.pub").read_text().split()[:2])
    (node1, _), (node2, _), (node3, _) = sandbox_cluster.nodes
    expect = tmp_path / "expected"
    expect.write_text(f"{node1} {pinned[node1].fingerprint}\n"
                      f"256 {other.fingerprint} root@{node2} (ED25519)\n"
                      f"{node3} {pinned[node3].fingerprint}\n")
    refused = scan(inv, "--expect", str(expect))
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert other.fingerprint in refused.stderr and pinned[node2].fingerprint in refused.stderr
    assert not known.exists()
    # The same file with the node's real fingerprint pins every node, asking nothing.
    expect.write_text(expect.read_text().replace(other.fingerprint, pinned[node2].fingerprint))
    done = scan(inv, "--expect", str(expect))
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(pinned[n].line in known.read_text() for n, _ in sandbox_cluster.nodes)


def test_a_changed_host_key_is_refused_with_both_fingerprints(sandbox_cluster, tmp_path):
    known = tmp_path / "known_hosts"
    inv = inventory_copy(sandbox_cluster, tmp_path, known)
    pinned = pinned_keys(sandbox_cluster)
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f",
                    str(tmp_path / "old")], check=True)
    old = HostKey.parse(*(tmp_path / "old.pub").read_text().split()[:2])
    node2, ip2 = sandbox_cluster.nodes[1]
    known.write_text(f"{node2},{ip2} {old.line}\n")
    refused = scan(inv, node2, answer="y\n")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert f"recorded {old.fingerprint}" in refused.stderr
    assert f"offered now {pinned[node2].fingerprint}" in refused.stderr
    assert known.read_text() == f"{node2},{ip2} {old.line}\n"


def test_init_probe_fills_in_what_the_nodes_are(sandbox_cluster, sandbox_name, node_ssh,
                                                tmp_path):
    """`init --probe` on the sandbox: host keys confirmed through the same path, then the
    nodes' real GPUs (none), OS and interfaces written into an inventory `check` accepts."""
    nodes_file = tmp_path / "nodes.txt"
    nodes_file.write_text("".join(f"{n} {ip}\n" for n, ip in sandbox_cluster.nodes))
    inv = tmp_path / "probed"
    proc = subprocess.run(
        [str(EXE), "init", "-i", str(inv), "--hosts-file", str(nodes_file),
         "--name", f"{sandbox_name}-init", "--user", "root",
         "--key", str(sandbox_cluster.state_dir / "ssh/id_ed25519"), "--probe"],
        cwd=REPO, env=dict(os.environ), input="y\n", capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded = yaml.safe_load((inv / "group_vars/all.yml").read_text())
    assert loaded["dsk_gpus_per_node"] == 0 and loaded["dsk_profile"] == "cpu-sandbox"
    hosts_text = (inv / "hosts.yml").read_text()
    for node, ip in sandbox_cluster.nodes:
        ifname = node_ssh(ip, f"ip -o -4 addr show | awk '$4 ~ \"^{ip}/\" {{print $2}}'")\
            .stdout.strip()
        assert ifname and loaded["dsk_socket_ifname"] == ifname
        line = next(ln for ln in hosts_text.splitlines() if ln.strip().startswith(f"{node}:"))
        assert "# 0 GPUs; Debian GNU/Linux 12 (bookworm);" in line
        assert f"{ifname} {ip}/" in line
        # The node's own interfaces, not those of the machine its container runs on.
        links = node_ssh(ip, "ip -o link show").stdout.splitlines()
        names = {ln.split()[1].rstrip(":").split("@")[0] for ln in links} - {"lo"}
        shown = {item.split()[0] for item in line.split("; ")[2].split(", ")}
        assert shown == names
    pinned = pinned_keys(sandbox_cluster)
    assert all(k.line in (inv / "known_hosts").read_text() for k in pinned.values())
    check = CliRunner().invoke(app, ["check", "-i", str(inv)])
    assert check.exit_code == 0, check.output
