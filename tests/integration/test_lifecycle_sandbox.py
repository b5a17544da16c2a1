"""Nodes brought in, taken out and replaced, on the shared sandbox (one module, in order).

The shared 3-node sandbox is given two spare nodes (running, not in the inventory):

1. node4 is added with `nodes add` (validation of the new node included): the existing
   nodes' run changes nothing but /etc/hosts and the ssh_trust tasks;
2. node5 is written into hosts.yml by hand and `bootstrap` brings it in while node2 is
   stopped: the addition completes and names node2; node2 starts again and the next
   `bootstrap` converges it;
3. every node reaches every other by name with the pinned host keys, and a training run
   uses all five;
4. node4 is removed alive (keeping the cluster key), node5 stopped and removed dead (the
   cluster key rotated): no remaining node trusts their host keys, and neither one's copy
   of the old cluster key logs in to a remaining node;
5. node3 gets new hardware (a new disk and host key) and `nodes replace` brings it back.

The module's finalizer puts the sandbox back as it found it (3 nodes, no spare, every
stopped node started) and, when a step failed, bootstraps it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsk_provision import state
from dsk_provision.inventory import load_inventory

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"
KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
SPARE = 2
# Ansible's task names of a trust refresh: the /etc/hosts task of roles/common and the
# ssh_trust role (its tasks are named with the role's prefix in the events).
REFRESH_ROLES = {"ssh_trust", "dsk_verify"}

pytestmark = pytest.mark.slow


class Cluster:
    """The shared sandbox with spares, and what the steps learn along the way."""

    def __init__(self, info, runs: Path, ssh_argv):
        self.info = info
        self.ssh_argv = ssh_argv
        self.runs = runs
        self.done = False
        self.old_keys: dict[str, str] = {}

    @property
    def inventory(self) -> Path:
        return self.info.inventory_path

    def ip(self, node: str) -> str:
        return dict(self.info.nodes + self.info.spare)[node]

    def dsk(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        env = dict(os.environ, DSK_RUNS_DIR=str(self.runs))
        return subprocess.run([str(Path(sys.prefix) / "bin" / "dsk-provision"), *args],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, *args: str) -> str:
        """The command's output, with the terminal's line wrapping undone; it must pass."""
        proc = self.dsk(*args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"dsk-provision {' '.join(args)}: {out[-6000:]}"
        return " ".join(out.split())

    def state_dir(self) -> Path:
        inv = load_inventory(self.inventory)
        return state.cluster_state_dir(inv.cluster_name)


@pytest.fixture(scope="module")
def cluster(bootstrapped_cluster, tmp_path_factory, ssh_argv):
    from dsk_provision import sandbox

    bootstrapped_cluster.require_success()
    base = bootstrapped_cluster.info
    grown = Cluster(sandbox.up(base.name, len(base.nodes), spare=SPARE),
                    tmp_path_factory.mktemp("lifecycle-runs"), ssh_argv)
    yield grown
    # As found: the 3 nodes running, no spare, the inventory of 3; converged again when
    # a step failed half-way.
    sandbox.up(base.name, len(base.nodes), spare=0)
    if not grown.done:
        grown.dsk("bootstrap", "-i", str(grown.inventory))


def _events(run_dir: Path) -> list[dict]:
    events = []
    for path in (run_dir / "ansible" / "artifacts").glob("*/job_events/*.json"):
        data = json.loads(path.read_text())
        if data.get("event") in ("runner_on_ok", "runner_on_failed", "runner_on_skipped"):
            events.append(data)
    return events


def _run_dir(runs: Path, command: str) -> Path:
    found = sorted(runs.glob(f"*-{command}"))
    assert found, f"no {command} run in {sorted(p.name for p in runs.iterdir())}"
    return found[-1]


def _pinned(cluster: Cluster, on: str) -> str:
    out = subprocess.run(_ssh(cluster, cluster.ip(on), f"cat {KNOWN_HOSTS}"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _ssh(cluster: Cluster, ip: str, command: str) -> list[str]:
    return cluster.ssh_argv(cluster.info, ip, command)


def _control_key(cluster: Cluster, node: str) -> str:
    """node's host key as the control node pins it (the sandbox's known_hosts)."""
    for line in (cluster.info.state_dir / "ssh/known_hosts").read_text().splitlines():
        names, *key = line.split()
        if node in names.split(","):
            return " ".join(key[:2])
    raise AssertionError(f"{node} is not in the sandbox's known_hosts")


def _reaches_every_other(cluster: Cluster, names: list[str]) -> None:
    """From every node, ssh to every other by name, with the cluster key and the pinned
    host keys (the ~/.ssh/config block), and get its hostname back."""
    loop = "; ".join(f"ssh -o BatchMode=yes -o ConnectTimeout=10 {n} hostname" for n in names)
    for name in names:
        out = subprocess.run(_ssh(cluster, cluster.ip(name), loop), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, f"from {name}: {out.stdout}{out.stderr}"
        assert out.stdout.split() == names, f"from {name}: {out.stdout}"


def test_spare_nodes_are_running_and_left_out_of_the_inventory(cluster):
    from dsk_provision import sandbox

    assert [n for n, _ in cluster.info.spare] == ["node4", "node5"]
    inv = load_inventory(cluster.inventory)
    assert [n.name for n in inv.nodes] == ["node1", "node2", "node3"]
    (row,) = sandbox.status(cluster.info.name)
    assert row["spare"] == ["node4", "node5"]
    assert {n["name"]: n["state"] for n in row["nodes"]}["node5"] == "running"


def test_nodes_add_touches_only_trust_on_the_existing_nodes_and_validates(cluster):
    proc = cluster.dsk("nodes", "add", "-i", str(cluster.inventory), "node4",
                       "--host", cluster.ip("node4"))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "1 new node: full bootstrap (node4); 3 existing: trust refresh only" in out, out
    assert "added node4 to" in out, out
    # Then validate: node4's checks, and an all-reduce across the 4 nodes. Its verdict
    # follows the machine's load (the sandbox profile's CPU bandwidth floors): a failed
    # check fails the command after the addition, which stays done.
    assert ("validating the new nodes (node4): their checks, and an all-reduce across "
            "the 4 nodes in service") in out, out
    assert proc.returncode == 0 or "node4 brought in (recorded), but validation failed" in out, out
    report_dir = _run_dir(cluster.runs, "validate")
    assert sorted(p.name for p in (report_dir / "facts").iterdir()) == ["node4.json"]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["allreduce"]["world_size"] == 4
    refresh = _run_dir(cluster.runs, "trust-refresh")
    events = _events(refresh)
    hosts = {e["event_data"]["host"] for e in events}
    assert hosts <= {"node1", "node2", "node3"}, hosts
    changed = {(e["event_data"]["host"], e["event_data"].get("role"),
                e["event_data"]["task"]) for e in events
               if e["event"] == "runner_on_ok" and e["event_data"]["res"].get("changed")}
    assert changed, "the existing nodes learnt nothing about node4"
    for host, role, task in changed:
        assert role in REFRESH_ROLES or "/etc/hosts" in task, (host, role, task)
    # Every task that ran there belongs to the refresh (besides the roles' argument
    # checks and the inventory check of every run, playbooks/boilerplate.yml: asserts on
    # the control node), and none gathered facts.
    for e in events:
        data = e["event_data"]
        if e["event"] == "runner_on_skipped" or data.get("task_action") in (
                "validate_argument_spec", "ansible.builtin.validate_argument_spec"):
            continue
        if "playbooks/boilerplate.yml:" in data.get("task_path", ""):
            assert data.get("task_action") in ("ansible.builtin.assert",
                                               "ansible.builtin.find"), data["task"]
            continue
        assert (data.get("role") in REFRESH_ROLES | {"dsk_defaults"}
                or "/etc/hosts" in data["task"]), (data.get("role"), data["task"])
        assert data.get("task_action") not in ("setup", "ansible.builtin.setup",
                                               "gather_facts"), data["task"]
    assert "node4" in _pinned(cluster, "node1")


def test_bootstrap_brings_in_a_hand_written_node_while_an_existing_one_is_down(cluster):
    from dsk_provision import sandbox

    text = cluster.inventory.read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("node4:"))
    indent = line[:len(line) - len(line.lstrip())]
    cluster.inventory.write_text(
        text.rstrip("\n") + f"\n{indent}node5:\n{indent}  ansible_host: {cluster.ip('node5')}\n")
    sandbox.stop_node(cluster.info.name, "node2")
    try:
        out = cluster.ok("bootstrap", "-i", str(cluster.inventory), "--no-validate")
    finally:
        sandbox.up(cluster.info.name, 3, spare=SPARE)
    assert "1 new node: full bootstrap (node5); 4 existing: trust refresh only" in out
    assert "node2 did not answer" in out
    assert "node5" not in _pinned(cluster, "node2")
    out = cluster.ok("bootstrap", "-i", str(cluster.inventory), "--no-validate")
    assert "no new node: full bootstrap of all 5 nodes" in out
    assert "missed the last trust refresh: node2" in out
    assert "node5" in _pinned(cluster, "node2")


def test_every_node_reaches_every_other_and_training_uses_all_five(cluster):
    names = ["node1", "node2", "node3", "node4", "node5"]
    _reaches_every_other(cluster, names)
    from dsk_provision.joblaunch import train

    result = train(load_inventory(cluster.inventory), TINY, runs_dir=cluster.runs,
                   timeout_s=600)
    assert result.world_size == 5
    for name in names:
        assert (result.run_dir / "logs" / f"{name}.log").stat().st_size > 0


def _logins_with_own_key(cluster: Cluster, node: str, to: list[str]) -> dict[str, str]:
    """From ``node``, ssh to each of ``to`` by name as the role set it up there (its copy
    of the cluster key, the pinned host keys): {name: "ok" or ssh's last line}."""
    loop = (f"for n in {' '.join(to)}; do "
            "if out=$(ssh -o BatchMode=yes -o ConnectTimeout=10 $n true 2>&1); "
            'then echo "$n: ok"; else echo "$n: $(echo "$out" | tail -n 1)"; fi; done')
    out = subprocess.run(_ssh(cluster, cluster.ip(node), loop), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answers = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    return {n: answers.get(n, "no output") for n in to}


def test_removed_nodes_alive_or_dead_are_trusted_nowhere(cluster):
    from dsk_provision import sandbox

    stay = ["node1", "node2", "node3"]
    keys = {n: _control_key(cluster, n) for n in ("node4", "node5")}
    for n, key in keys.items():
        assert key in _pinned(cluster, "node1"), n
    # node4 goes first without a key rotation (as when several nodes go, the last one
    # rotates): its copy of the cluster key still logs in everywhere, and it is said.
    out = cluster.ok("nodes", "remove", "-i", str(cluster.inventory), "node4", "--yes",
                     "--keep-key")
    assert "the cluster key is unchanged (--keep-key): node4's copy" in out, out
    assert _logins_with_own_key(cluster, "node4", stay) == dict.fromkeys(stay, "ok")
    sandbox.stop_node(cluster.info.name, "node5")
    try:
        out = cluster.ok("nodes", "remove", "-i", str(cluster.inventory), "node5", "--yes")
    finally:
        sandbox.up(cluster.info.name, 3, spare=SPARE)
    assert "cluster key rotated on 3 nodes" in out, out
    inv = load_inventory(cluster.inventory)
    assert [n.name for n in inv.nodes] == stay
    # Neither removed node's copy of the old cluster key is accepted by a remaining node,
    # and the remaining nodes reach each other with the new one.
    for gone in ("node4", "node5"):
        for name, answer in _logins_with_own_key(cluster, gone, stay).items():
            assert "Permission denied" in answer, (gone, name, answer)
    _reaches_every_other(cluster, stay)
    for name in ("node1", "node2", "node3"):
        pinned = _pinned(cluster, name)
        for gone, key in keys.items():
            assert key.split()[1] not in pinned and gone not in pinned, (name, gone)
        # Asked to connect to the removed node, a remaining node refuses its host key.
        out = subprocess.run(_ssh(cluster, cluster.ip(name),
                                  f"ssh -o BatchMode=yes {cluster.ip('node4')} true"),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "host key" in (out.stdout + out.stderr).lower(), out.stderr
    hosts = subprocess.run(_ssh(cluster, cluster.ip("node1"), "cat /etc/hosts"),
                           capture_output=True, text=True, timeout=60).stdout
    assert "node4" not in hosts and "node5" not in hosts


def test_a_replaced_node_is_pinned_with_its_new_host_key(cluster):
    from dsk_provision import sandbox

    old = _control_key(cluster, "node3")
    sandbox.reimage_node(cluster.info.name, "node3")
    new = _control_key(cluster, "node3")
    assert new != old
    out = cluster.ok("nodes", "replace", "-i", str(cluster.inventory), "node3", "--yes",
                     "--no-validate")
    assert "node3" in out
    for name in ("node1", "node2", "node3"):
        pinned = _pinned(cluster, name)
        assert new.split()[1] in pinned and old.split()[1] not in pinned, name
    _reaches_every_other(cluster, ["node1", "node2", "node3"])
    cluster.done = True
