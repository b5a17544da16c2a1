"""The fast re-run must not hide drift: break what the roles manage on a node, and the next
bootstrap must see it and repair it (changed > 0), check mode must report it without
touching it, and the run after the repair must change nothing.

Its own 2-node sandbox "drift" (root, systemd-nspawn), bootstrapped once for the module;
taken down even when a test fails, and cleared first in case an interrupted run left it.
The trainer shipped is a copy taken at the start, so that an edit under trainer/ during
the tests is not mistaken for drift.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SANDBOX_NAME = "drift"
NODES = 2
MIRROR_LIST = "/etc/apt/sources.list.d/dsk-mirror.list"
KEY = "/root/.ssh/id_ed25519_dsk"
KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"

# What is broken on node1, one command per kind of resource the probes verify; and how
# to tell, on the node, that it was repaired (a command that must exit 0).
BREAKS = {
    "managed file removed": (
        f"rm -f {MIRROR_LIST}", f"grep -q 'Managed by dsk-provision' {MIRROR_LIST}"),
    "distribution source put back": (
        "echo 'deb http://deb.debian.org/debian bookworm main' > /etc/apt/sources.list",
        "test ! -e /etc/apt/sources.list && test -e /etc/apt/sources.list.dsk-disabled"),
    "managed package removed": (
        "dpkg -r jq", "dpkg-query -W -f='${db:Status-Abbrev}' jq | grep -q '^ii'"),
    "/etc/hosts block edited": ("sed -i '/ node2$/d' /etc/hosts", "grep -q ' node2$' /etc/hosts"),
    "private key mode": (f"chmod 0644 {KEY}", f"test $(stat -c %a {KEY}) = 600"),
    "authorized key removed": (
        "sed -i '/dsk-drift$/d' /root/.ssh/authorized_keys",
        "grep -q 'dsk-drift$' /root/.ssh/authorized_keys"),
    "known_hosts entry removed": (
        f"sed -i '/^node2,/d' {KNOWN_HOSTS}", f"grep -q '^node2,' {KNOWN_HOSTS}"),
    "ssh config block edited": (
        "sed -i 's/StrictHostKeyChecking yes/StrictHostKeyChecking ask/' /root/.ssh/config",
        "grep -q 'StrictHostKeyChecking yes' /root/.ssh/config"),
    "trainer module removed": (
        "rm /opt/dsk/trainer/config.py", "test -s /opt/dsk/trainer/config.py"),
    "trainer module edited": (
        "echo 'raise SystemExit(1)' >> /opt/dsk/trainer/data.py",
        "! grep -q 'raise SystemExit(1)' /opt/dsk/trainer/data.py"),
    "stale trainer module": (
        "touch /opt/dsk/trainer/stale_module.py", "test ! -e /opt/dsk/trainer/stale_module.py"),
    "GPU stack file edited": (
        "echo '* soft memlock 64' > /etc/security/limits.d/90-dsk-rdma-memlock.conf",
        "grep -q unlimited /etc/security/limits.d/90-dsk-rdma-memlock.conf"),
    "RDMA package removed": (
        "dpkg -r perftest", "dpkg-query -W -f='${db:Status-Abbrev}' perftest | grep -q '^ii'"),
    "container settings mode": (
        "chmod 0600 /etc/containers/storage.conf",
        "test $(stat -c %a /etc/containers/storage.conf) = 644"),
}


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory, ssh_argv):
    from dsk_provision import sandbox
    from dsk_provision.inventory import load_inventory

    request.addfinalizer(lambda: sandbox.down(SANDBOX_NAME))
    sandbox.down(SANDBOX_NAME)  # leftovers of an interrupted run
    trainer = tmp_path_factory.mktemp("src") / "trainer"
    shutil.copytree(REPO / "trainer", trainer,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    _TRAINER_SOURCE.append(str(trainer))
    info = sandbox.up(SANDBOX_NAME, NODES)
    inventory = load_inventory(info.inventory_path)
    first = _bootstrap(inventory, tmp_path_factory.mktemp("first"))
    assert first.ok, first.failed
    return info, inventory, ssh_argv


_TRAINER_SOURCE: list[str] = []


def _bootstrap(inventory, runs_dir, *, check: bool = False, extra: dict | None = None):
    from rich.console import Console

    from dsk_provision.runner import run_playbook

    return run_playbook("site.yml", inventory, command="bootstrap", runs_dir=runs_dir,
                        check=check, console=Console(quiet=True),
                        extra_vars={"trainer_env_source_dir": _TRAINER_SOURCE[-1],
                                    **(extra or {})})


def _on(cluster, node: str, command: str) -> subprocess.CompletedProcess:
    info, _inventory, ssh_argv = cluster
    return subprocess.run(ssh_argv(info, dict(info.nodes)[node], command), capture_output=True,
                          text=True, timeout=120)


def _changed(result) -> dict[str, int]:
    return {host: counts.get("changed", 0) for host, counts in result.recap.items()}


def test_every_break_is_seen_reported_by_check_mode_and_repaired(cluster, tmp_path):
    inventory = cluster[1]
    for what, (command, _repaired) in BREAKS.items():
        proc = _on(cluster, "node1", command)
        assert proc.returncode == 0, f"could not break {what}: {proc.stderr}"
    broken = [what for what, (_c, repaired) in BREAKS.items()
              if _on(cluster, "node1", repaired).returncode == 0]
    assert broken == [], f"these were not broken by their command: {broken}"

    check = _bootstrap(inventory, tmp_path / "check", check=True)
    assert check.ok, check.failed
    assert _changed(check)["node1"] > 0, "check mode did not report the drift"
    assert _changed(check)["node2"] == 0
    still = [what for what, (_c, repaired) in BREAKS.items()
             if _on(cluster, "node1", repaired).returncode == 0]
    assert still == [], f"check mode changed the node: {still}"

    repair = _bootstrap(inventory, tmp_path / "repair")
    assert repair.ok, repair.failed
    assert _changed(repair)["node1"] > 0
    assert _changed(repair)["node2"] == 0
    left = [what for what, (_c, repaired) in BREAKS.items()
            if _on(cluster, "node1", repaired).returncode != 0]
    assert left == [], f"not repaired: {left}"
    # That the repair left nothing to do is asserted by the next runs on this sandbox:
    # each of test_one_break_alone_is_repaired's bootstraps requires node1's changed=0.


@pytest.mark.parametrize("what", ["managed file removed", "private key mode",
                                  "trainer module edited", "GPU stack file edited"])
def test_one_break_alone_is_repaired(cluster, tmp_path, what):
    """Each probe on its own: one difference is enough to run its role's converge tasks."""
    inventory = cluster[1]
    command, repaired = BREAKS[what]
    assert _on(cluster, "node2", command).returncode == 0
    result = _bootstrap(inventory, tmp_path)
    assert result.ok, result.failed
    assert _changed(result) == {"node1": 0, "node2": _changed(result)["node2"]}
    assert _changed(result)["node2"] > 0
    assert _on(cluster, "node2", repaired).returncode == 0, f"{what} was not repaired"


def test_forced_converge_runs_every_role_and_changes_nothing(cluster, tmp_path):
    """dsk_force_converge runs the converge tasks without drift: they are idempotent too."""
    inventory = cluster[1]
    quiet = _bootstrap(inventory, tmp_path / "quiet")
    forced = _bootstrap(inventory, tmp_path / "forced", extra={"dsk_force_converge": True})
    assert forced.ok, forced.failed
    assert all(count == 0 for count in _changed(forced).values()), _changed(forced)
    # The converge tasks ran: more tasks were ok than in a run that found no drift.
    assert forced.recap["node1"]["ok"] > quiet.recap["node1"]["ok"], (forced.recap, quiet.recap)
