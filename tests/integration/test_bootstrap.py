"""`dsk-provision bootstrap` on the 3-node sandbox, and the node facts of `validate`.

Uses the session fixtures of conftest.py: the sandbox is bootstrapped once by the CLI;
these tests then check what a user relies on: a second run changes nothing, nodes reach
each other by name with pinned host keys, the cluster key is private, the trainer imports.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import time

import pytest
from rich.console import Console

NODE_NAMES = ("node1", "node2", "node3")


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def _nodes(info) -> list[tuple[str, str]]:
    return list(info.nodes)


def test_first_bootstrap_succeeds(bootstrapped_cluster):
    bootstrapped_cluster.require_success()


# What an 8-node bootstrap may print at most; a 3-node one prints the same lines (only a
# task that changes or fails on some nodes adds any), so the 3-node output is held to it.
CONSOLE_LINE_BUDGET = 150


def test_first_bootstrap_console_fits_the_line_budget(bootstrapped_cluster):
    """The bootstrap's console, captured as a non-terminal: plain lines, no redrawing, no
    line per host and task; the per-host detail is in the run directory."""
    bootstrapped_cluster.require_success()
    out = bootstrapped_cluster.output
    lines = out.splitlines()
    print(f"console of a first bootstrap of {len(NODE_NAMES)} nodes: {len(lines)} lines")
    assert len(lines) <= CONSOLE_LINE_BUDGET, out
    assert "\x1b[" not in out  # no cursor movement or colour when not a terminal
    assert not [ln for ln in lines if re.match(r"\s+node\d: (ok|skipped|changed) ", ln)], out
    assert sum(ln.startswith("PLAY ") for ln in lines) >= 5, out
    # every task that changed something has its line; the hosts' logs have every result
    assert re.search(r"^  changed +common : Point apt at the mirror: changed 3 "
                     r"\(node1, node2, node3\)", out, re.M), out
    run_dir = next(bootstrapped_cluster.runs_dir.glob("*-bootstrap"))
    for name in NODE_NAMES:
        log = (run_dir / "hosts" / f"{name}.log").read_text()
        assert re.search(r"^\d\d:\d\d:\d\d ok +Check that the operating system is supported",
                         log, re.M), log[:2000]


def test_second_bootstrap_changes_nothing(bootstrapped_cluster, tmp_path):
    from dsk_provision.inventory import load_inventory
    from dsk_provision.runner import run_playbook

    bootstrapped_cluster.require_success()
    inventory = load_inventory(bootstrapped_cluster.info.inventory_path)
    started = time.monotonic()
    result = run_playbook("site.yml", inventory, command="bootstrap", runs_dir=tmp_path,
                          console=_quiet())
    print(f"idempotent re-run of {len(inventory.nodes)} nodes: "
          f"{time.monotonic() - started:.1f} s")
    assert result.ok
    assert sorted(result.recap) == sorted(n.name for n in inventory.nodes)
    changed = {host: counts.get("changed", 0) for host, counts in result.recap.items()}
    assert all(count == 0 for count in changed.values()), changed


def test_every_node_reaches_every_node_by_name(bootstrapped_cluster, node_ssh):
    bootstrapped_cluster.require_success()
    for _name, ip in _nodes(bootstrapped_cluster.info):
        loop = "; ".join(f"ssh -o BatchMode=yes {peer} hostname" for peer in NODE_NAMES)
        proc = node_ssh(ip, loop)
        assert proc.stdout.split() == list(NODE_NAMES), proc.stdout + proc.stderr


def test_host_keys_are_pinned(bootstrapped_cluster, node_ssh):
    bootstrapped_cluster.require_success()
    nodes = _nodes(bootstrapped_cluster.info)
    node1_ip = nodes[0][1]
    known = node_ssh(node1_ip, "cat /etc/ssh/ssh_known_hosts").stdout
    for name, ip in nodes:
        key = node_ssh(ip, "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2]
        assert f"{name},{ip} {key[0]} {key[1]}" in known, (name, known)
    config = node_ssh(node1_ip, "cat ~/.ssh/config").stdout
    assert "StrictHostKeyChecking yes" in config
    assert "UserKnownHostsFile /etc/ssh/ssh_known_hosts" in config
    # With the pins out of reach, the same connection must be refused, not trusted.
    proc = node_ssh(node1_ip, "ssh -o BatchMode=yes -o UserKnownHostsFile=/dev/null "
                    "-o GlobalKnownHostsFile=/dev/null node2 hostname", check=False)
    assert proc.returncode != 0
    assert "Host key verification failed" in proc.stderr


def test_cluster_private_key_is_private(bootstrapped_cluster, node_ssh):
    bootstrapped_cluster.require_success()
    from dsk_provision.inventory import load_inventory
    from dsk_provision.trust import key_dir

    info = bootstrapped_cluster.info
    local_key = key_dir(load_inventory(info.inventory_path)) / "id_ed25519"
    assert stat.S_IMODE(os.stat(local_key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(local_key.parent).st_mode) == 0o700
    for _name, ip in _nodes(info):
        mode = node_ssh(ip, "stat -c '%a %U' /root/.ssh/id_ed25519_dsk").stdout.split()
        assert mode == ["600", "root"], (ip, mode)
    assert "PRIVATE KEY" not in bootstrapped_cluster.output


def test_trainer_imports_on_every_node(bootstrapped_cluster, node_ssh):
    bootstrapped_cluster.require_success()
    for _name, ip in _nodes(bootstrapped_cluster.info):
        proc = node_ssh(ip, "PYTHONPATH=/opt/dsk /opt/dsk/venv/bin/python -c "
                        "'import trainer; print(trainer.__file__)'")
        assert proc.stdout.strip() == "/opt/dsk/trainer/__init__.py", proc.stdout


def test_gpu_stack_parts_that_apply_to_cpu_nodes_ran(bootstrapped_cluster, node_ssh):
    """The sandbox has no GPUs: the RDMA userspace, the container runtime and the NCCL
    settings apply and are installed from the mirror; the GPU-only roles say why not."""
    bootstrapped_cluster.require_success()
    for _name, ip in _nodes(bootstrapped_cluster.info):
        pkgs = node_ssh(ip, "dpkg-query -W -f='${Package} ${Status}\\n' "
                        "rdma-core ibverbs-utils infiniband-diags perftest podman").stdout
        for pkg in ("rdma-core", "ibverbs-utils", "infiniband-diags", "perftest", "podman"):
            assert f"{pkg} install ok installed" in pkgs, pkgs
        assert "NCCL_SOCKET_IFNAME=eth0" in node_ssh(ip, "cat /etc/nccl.conf").stdout
        assert node_ssh(ip, "podman --version").stdout.startswith("podman version")
        # The runtime works, not just installs: its storage and services are healthy.
        driver = node_ssh(ip, "podman info --format '{{.Store.GraphDriverName}}'").stdout
        assert driver.strip() == "vfs"
        state = node_ssh(ip, "systemctl is-system-running; systemctl --failed --plain --no-legend",
                         check=False).stdout
        assert state.split() == ["running"], state
        limits = node_ssh(ip, "cat /etc/security/limits.d/*memlock*").stdout
        assert "unlimited" in limits
    out = bootstrapped_cluster.output
    assert "no NVIDIA GPU" in out, "the driver role must say why it skips"


def test_validate_playbook_writes_node_facts(bootstrapped_cluster, tmp_path):
    from dsk_provision.inventory import load_inventory
    from dsk_provision.runner import run_playbook

    bootstrapped_cluster.require_success()
    inventory = load_inventory(bootstrapped_cluster.info.inventory_path)
    run_dir = tmp_path / "run"
    result = run_playbook("validate.yml", inventory, command="validate",
                          runs_dir=tmp_path / "runs", console=_quiet(),
                          extra_vars={"dsk_run_dir": str(run_dir)})
    assert result.ok
    for name in NODE_NAMES:
        facts = json.loads((run_dir / "facts" / f"{name}.json").read_text())
        assert facts["host"] == name and facts["hostname"] == name
        assert facts["os"] == {"distribution": "Debian", "version": "12"}
        assert facts["cpus"] >= 1 and facts["mem_total_mb"] > facts["mem_available_mb"] > 0
        assert set(facts["disk_free_gb"]) == {"/", "/opt/dsk"}
        assert facts["gpus"] == {"declared": 0, "detected": 0, "models": []}
        assert facts["nvidia_driver"] is None and "nvidia_driver" in facts["skipped"]
        assert facts["python"]["torch"].split("+")[0] == "2.13.0"
        assert facts["python"]["cuda_available"] is False
        assert facts["time_synced"] is not None or "time_synced" in facts["skipped"]
        assert facts["ssh_peers"] == {peer: True for peer in NODE_NAMES if peer != name}


@pytest.mark.parametrize("bad", [{"dsk_gpus_per_node": 2}])
def test_bootstrap_stops_on_a_gpu_mismatch_before_any_change(bootstrapped_cluster, tmp_path,
                                                             bad):
    from dsk_provision.errors import RunFailed
    from dsk_provision.inventory import load_inventory
    from dsk_provision.runner import run_playbook

    bootstrapped_cluster.require_success()
    inventory = load_inventory(bootstrapped_cluster.info.inventory_path)
    with pytest.raises(RunFailed) as failure:
        run_playbook("site.yml", inventory, command="bootstrap", runs_dir=tmp_path,
                     console=_quiet(), extra_vars=bad, tags=["preflight"])
    assert sorted(failure.value.nodes) == list(NODE_NAMES)
    assert "declares 2 GPUs" in str(failure.value) and "0 NVIDIA GPUs" in str(failure.value)
