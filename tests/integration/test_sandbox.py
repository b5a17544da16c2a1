"""The sandbox cluster itself: real nodes, real SSH, real teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from dsk_provision import sandbox
from dsk_provision.errors import InputError
from dsk_provision.sandbox import host, naming, nodes, render

SCRATCH = "itdown"  # a second sandbox for tests that take one down


def test_nodes_answer_ssh_with_pinned_host_keys(sandbox_cluster, node_ssh, ssh_argv, tmp_path):
    assert [n for n, _ in sandbox_cluster.nodes] == ["node1", "node2", "node3"]
    for node, ip in sandbox_cluster.nodes:
        assert node_ssh(ip, "hostname").stdout.strip() == node
    # The same connection with no pinned key must be refused: pinning is what lets it in.
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    ip = sandbox_cluster.nodes[0][1]
    proc = subprocess.run(ssh_argv(sandbox_cluster, ip, "true", known_hosts=empty),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "Host key verification failed" in proc.stderr


def test_keys_and_known_hosts(sandbox_cluster):
    sd = sandbox_cluster.state_dir
    assert (sd / "ssh/id_ed25519").stat().st_mode & 0o777 == 0o600
    lines = (sd / "ssh/known_hosts").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [f"{n},{ip}" for n, ip in sandbox_cluster.nodes]
    keys = {line.split()[2] for line in lines}
    assert len(keys) == len(lines), "every node must have its own host key"


def test_systemd_runs_inside(sandbox_cluster, node_ssh):
    for _, ip in sandbox_cluster.nodes:
        proc = node_ssh(ip, "systemctl is-system-running --wait; ps -p 1 -o comm=", check=False)
        assert proc.stdout.split() == ["running", "systemd"], proc.stdout + proc.stderr


def test_hostnames_and_hosts_file(sandbox_cluster, node_ssh):
    ip1 = sandbox_cluster.nodes[0][1]
    for node, ip in sandbox_cluster.nodes:
        # Every entry for the name (the sandbox's own, and the common role's block once
        # bootstrapped) points at the node's address.
        lines = node_ssh(ip1, f"getent ahostsv4 {node}").stdout.splitlines()
        assert lines and {line.split()[0] for line in lines} == {ip}
    ids = {node_ssh(ip, "cat /etc/machine-id").stdout.strip() for _, ip in sandbox_cluster.nodes}
    assert len(ids) == len(sandbox_cluster.nodes)


def test_nodes_reach_each_other(sandbox_cluster, node_ssh):
    ip1 = sandbox_cluster.nodes[0][1]
    probe = ("import socket; s = socket.create_connection(('node3', 22), 5); "
             "print(s.recv(8).decode())")
    assert node_ssh(ip1, f'python3 -c "{probe}"').stdout.startswith("SSH-2.0")


def test_inventory_describes_the_sandbox(sandbox_cluster):
    doc = yaml.safe_load(sandbox_cluster.inventory_path.read_text())
    hosts = doc["all"]["children"]["nodes"]["hosts"]
    assert [(n, h["ansible_host"]) for n, h in hosts.items()] == sandbox_cluster.nodes
    v = doc["all"]["vars"]
    assert v["dsk_mirror_url"] == sandbox_cluster.mirror_url
    assert f"ControlPath={sandbox_cluster.state_dir}/cp/%C" in v["ansible_ssh_common_args"]


def test_mirror_served_and_installable(sandbox_cluster, node_ssh):
    """The sandbox's mirror serves its packages, signed: a node installs from it with apt
    checking the signature against the key the inventory pins (a private source list, so
    that the node's own sources, bootstrapped or not, stay as they are)."""
    import base64
    import importlib.util
    import shlex

    from dsk_provision import mirror_sign

    with urllib.request.urlopen(sandbox_cluster.mirror_url + "Packages", timeout=10) as r:
        index = r.read().decode()
    for pkg in sandbox.MIRROR_PACKAGES:
        assert f"Package: {pkg}\n" in index
    with urllib.request.urlopen(sandbox_cluster.mirror_url + mirror_sign.public_key_name(),
                                timeout=10) as r:
        served_key = r.read()
    spec = importlib.util.spec_from_file_location(
        "dsk_apt_key", Path(__file__).resolve().parents[2] / "library/dsk_apt_key.py")
    apt_key = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(apt_key)
    binary, found = apt_key.primary_fingerprints(served_key)
    pinned = yaml.safe_load(sandbox_cluster.inventory_path.read_text())["all"]["vars"][
        "dsk_mirror_key_fingerprint"]
    assert found == [pinned]
    ip = sandbox_cluster.nodes[2][1]
    keyring, src, lists = ("/tmp/dsk-sandbox-test.gpg", "/tmp/dsk-sandbox-test.list",
                           "/tmp/dsk-sandbox-test-lists")
    apt = (f"apt-get -q -o Dir::Etc::SourceList={src} -o Dir::Etc::SourceParts=/nonexistent "
           f"-o Dir::State::Lists={lists}")
    line = f"deb [signed-by={keyring}] {sandbox_cluster.mirror_url} ./"
    try:
        node_ssh(ip, f"echo {base64.b64encode(binary).decode()} | base64 -d > {keyring} && "
                     f"echo {shlex.quote(line)} > {src} && mkdir -p {lists}/partial && "
                     f"{apt} update && DEBIAN_FRONTEND=noninteractive "
                     f"{apt} install -y --no-install-recommends pciutils")
        assert "lspci version" in node_ssh(ip, "lspci --version").stdout
    finally:
        node_ssh(ip, f"rm -rf {src} {keyring} {lists}", check=False)


def test_venv_works_inside_nodes(sandbox_cluster, node_ssh):
    out = node_ssh(sandbox_cluster.nodes[1][1],
                   "/opt/dsk/venv/bin/python -c 'import torch; print(torch.__version__)'")
    assert out.stdout.strip() == version("torch")


def test_status_and_idempotent_up(sandbox_cluster):
    rows = sandbox.status(sandbox_cluster.name)
    assert len(rows) == 1 and rows[0]["mirror"] == "running"
    assert [(n["name"], n["state"]) for n in rows[0]["nodes"]] == [
        ("node1", "running"), ("node2", "running"), ("node3", "running")]
    before = json.loads((sandbox_cluster.state_dir / "state.json").read_text())
    again = sandbox.up(sandbox_cluster.name, 3)
    after = json.loads((sandbox_cluster.state_dir / "state.json").read_text())
    assert again.to_dict() == sandbox_cluster.to_dict()
    assert [n["pid"] for n in after["nodes"]] == [n["pid"] for n in before["nodes"]]


def test_subnet_in_use_is_refused_before_any_change(sandbox_cluster):
    with pytest.raises(InputError) as exc:
        sandbox.up("itclash", 1, subnet=sandbox_cluster.subnet)
    assert exc.value.field == "subnet"
    assert not naming.state_dir("itclash").exists()


def test_a_node_started_again_is_reached_at_once():
    """A node whose network is made anew (a restart, a reimage) keeps its MAC addresses,
    so a neighbour that talked to it a moment before reaches it at once instead of
    sending to a MAC that is gone until its neighbour entry expires (15-45 s)."""
    from dsk_provision.sandbox import network

    name = "itmac"
    net = naming.derive_subnet(name)
    network.remove_all(name)  # leftovers of an earlier run
    serve = ("import socket, sys; s = socket.socket(); "
             "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
             f"s.bind(('{naming.node_ip(net, 2)}', 2222)); s.listen(); print('up', flush=True); "
             "c, _ = s.accept(); c.close()")
    connect = ("import socket, time; t = time.monotonic(); "
               f"socket.create_connection(('{naming.node_ip(net, 2)}', 2222), 8).close(); "
               "print(round(time.monotonic() - t, 2))")

    def connect_once() -> subprocess.CompletedProcess:
        ns2 = naming.netns_name(name, "node2")
        server = subprocess.Popen(["ip", "netns", "exec", ns2, sys.executable, "-c", serve],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "up"
            return subprocess.run(["ip", "netns", "exec", naming.netns_name(name, "node1"),
                                   sys.executable, "-c", connect],
                                  capture_output=True, text=True, timeout=30)
        finally:
            server.kill()
            server.wait()

    try:
        network.check_subnet_free(name, net)
        network.ensure_bridge(name, net)
        for i in (1, 2):
            network.create_node_net(name, i, net)
        assert connect_once().returncode == 0
        network.create_node_net(name, 2, net)  # node2 started again
        again = connect_once()
        assert again.returncode == 0, again.stderr
        for i in (1, 2):
            eth0 = json.loads(subprocess.run(
                ["ip", "-n", naming.netns_name(name, f"node{i}"), "-j", "link", "show", "eth0"],
                capture_output=True, text=True, check=True).stdout)[0]
            assert eth0["address"] == naming.mac_address(name, "node", i)
    finally:
        network.remove_all(name)
    assert not any(naming.netns_re(name).fullmatch(ns) for ns in network.netns_list())


def test_link_rate(sandbox_cluster):
    veth = naming.veth_name(sandbox_cluster.name, 2)
    try:
        sandbox.set_link_rate(sandbox_cluster.name, "node2", "10mbit")
        assert "rate 10Mbit" in host.run(["tc", "qdisc", "show", "dev", veth]).stdout
    finally:
        sandbox.set_link_rate(sandbox_cluster.name, "node2", None)
    assert "tbf" not in host.run(["tc", "qdisc", "show", "dev", veth]).stdout
    with pytest.raises(InputError):
        sandbox.set_link_rate(sandbox_cluster.name, "node9", "10mbit")


def _leftovers(name: str, state: dict) -> list[str]:
    sd = naming.state_dir(name)
    found = []
    pids = [n["pid"] for n in state["nodes"]] + [state["mirror_pid"]]
    found += [f"process {p}" for p in pids if host.proc_cmdline(p) is not None]
    found += [f"container process {p}" for p in host.find_container_pids(f"{sd}/nodes/")]
    found += [f"mount {m}" for m in nodes.mounted_under(sd)] if sd.exists() else []
    netns = host.run(["ip", "netns", "list"]).stdout
    found += [f"netns {line}" for line in netns.splitlines() if f"dsk-{name}-" in line]
    links = host.run(["ip", "-o", "link", "show"]).stdout
    found += [f"link {line.split(':')[1]}" for line in links.splitlines()
              if f"dsk{name}h" in line or naming.bridge_name(name) in line]
    prop = Path("/run/systemd/nspawn/propagate")
    found += [f"propagate {d}" for d in prop.glob(f"dsk-{name}-*")] if prop.is_dir() else []
    found += [f"state dir {sd}"] if sd.exists() else []
    return found


@pytest.fixture
def scratch():
    sandbox.down(SCRATCH)
    yield SCRATCH
    sandbox.down(SCRATCH)


def test_up_after_crash_then_down_leaves_nothing(scratch, ssh_argv):
    info = sandbox.up(scratch, 2)
    sd = info.state_dir
    crashed = json.loads((sd / "state.json").read_text())
    # Hold an SSH master open through the inventory's ControlPath, as Ansible does.
    args = yaml.safe_load(info.inventory_path.read_text())["all"]["vars"]
    master = subprocess.run(
        ["ssh", "-i", str(sd / "ssh/id_ed25519"), *args["ansible_ssh_common_args"].split(),
         "-o", "BatchMode=yes", f"root@{info.nodes[0][1]}", "true"], timeout=30)
    assert master.returncode == 0 and list((sd / "cp").iterdir())
    # A crash: every process killed, the state file lost; netns, veths, mounts remain.
    for pid in [n["pid"] for n in crashed["nodes"]] + [crashed["mirror_pid"]]:
        os.kill(pid, signal.SIGKILL)
    (sd / "state.json").unlink()
    time.sleep(0.5)
    info2 = sandbox.up(scratch, 2)
    assert info2.nodes == info.nodes
    state = json.loads((sd / "state.json").read_text())
    assert all(host.pid_matches(n["pid"], "--machine=") for n in state["nodes"])
    proc = subprocess.run(ssh_argv(info2, info2.nodes[1][1], "hostname"),
                          capture_output=True, text=True, timeout=30)
    assert proc.stdout.strip() == "node2", proc.stderr
    assert not _leftovers_of_crash(crashed, state)
    subprocess.run(["ssh", "-i", str(sd / "ssh/id_ed25519"),
                    *args["ansible_ssh_common_args"].split(), "-o", "BatchMode=yes",
                    f"root@{info.nodes[1][1]}", "true"], timeout=30, check=True)
    sandbox.down(scratch)
    assert _leftovers(scratch, state) == []


def _leftovers_of_crash(crashed: dict, state: dict) -> list[int]:
    old = {n["pid"] for n in crashed["nodes"]} | {crashed["mirror_pid"]}
    return [p for p in old if host.proc_cmdline(p) is not None]


def test_resize_adds_and_removes_nodes(scratch, ssh_argv):
    info = sandbox.up(scratch, 1)
    grown = sandbox.up(scratch, 3)
    assert [n for n, _ in grown.nodes] == ["node1", "node2", "node3"]
    ip1 = grown.nodes[0][1]
    hosts = subprocess.run(ssh_argv(grown, ip1, "cat /etc/hosts"), capture_output=True,
                           text=True, timeout=30, check=True).stdout
    assert hosts == render.render_etc_hosts(scratch, grown.nodes)
    state3 = json.loads((info.state_dir / "state.json").read_text())
    shrunk = sandbox.up(scratch, 2)
    assert [n for n, _ in shrunk.nodes] == ["node1", "node2"]
    assert len((info.state_dir / "ssh/known_hosts").read_text().splitlines()) == 2
    removed = state3["nodes"][2]
    assert host.proc_cmdline(removed["pid"]) is None
    assert not (info.state_dir / "nodes/node3").exists()
    assert naming.veth_name(scratch, 3) not in host.run(["ip", "-o", "link"]).stdout
    assert sandbox.status(scratch)[0]["nodes"] == [
        {"name": "node1", "ip": grown.nodes[0][1], "state": "running"},
        {"name": "node2", "ip": grown.nodes[1][1], "state": "running"}]
