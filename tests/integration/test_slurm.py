"""Slurm on the 3-node sandbox: bootstrap with dsk_slurm_enabled from the sandbox's mirror,
sinfo shows three idle nodes, validate reads Slurm's view, sbatch --test-only accepts the
launcher's script, `train --launcher slurm` lowers the loss across the three nodes,
scancel leaves nothing running, and a second bootstrap changes nothing.

Uses the session's bootstrapped sandbox: Slurm is turned on in its inventory for this
module and taken off again afterwards (services stopped, packages purged, the inventory
as it was), even when a test fails.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from dsk_provision import launch, slurm
from dsk_provision.inventory import load_inventory
from dsk_provision.runner import run_playbook
from dsk_provision.state import cluster_state_dir
from dsk_provision.validation import slurm_checks

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"
NODE_NAMES = ["node1", "node2", "node3"]
PACKAGES = "slurmd slurmctld slurm-client slurm-wlm-basic-plugins munge libmunge2"
REMOVE = ("systemctl disable --now slurmd slurmctld munge >/dev/null 2>&1; "
          f"apt-mark unhold {PACKAGES} >/dev/null 2>&1; "
          f"DEBIAN_FRONTEND=noninteractive apt-get purge -y -q {PACKAGES} >/dev/null 2>&1; "
          "DEBIAN_FRONTEND=noninteractive apt-get autoremove --purge -y -q >/dev/null 2>&1; "
          "rm -rf /etc/slurm /var/lib/slurm /var/log/slurm /etc/munge /var/lib/munge "
          "/etc/default/slurmd; systemctl reset-failed; true")


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def cluster(bootstrapped_cluster, node_ssh, request, tmp_path_factory):
    """The sandbox with Slurm on: its inventory says dsk_slurm_enabled, and the slurm
    concern of the bootstrap has run."""
    bootstrapped_cluster.require_success()
    info = bootstrapped_cluster.info
    path = Path(info.inventory_path)
    original = path.read_text()

    def restore():
        path.write_text(original)
        for _name, ip in info.nodes:
            node_ssh(ip, REMOVE, check=False)
    request.addfinalizer(restore)
    data = yaml.safe_load(original)
    data["all"]["vars"]["dsk_slurm_enabled"] = True
    path.write_text(original.split("\n", 1)[0] + "\n" + yaml.safe_dump(data, sort_keys=False))
    inventory = load_inventory(path)
    started = time.monotonic()
    result = run_playbook("site.yml", inventory, command="bootstrap",
                          runs_dir=tmp_path_factory.mktemp("slurm-runs"),
                          console=_quiet(), tags=["slurm"])
    print(f"slurm concern of the bootstrap: {time.monotonic() - started:.1f} s")
    assert result.ok
    return inventory


def _sinfo(node_ssh, ip) -> dict[str, str]:
    out = node_ssh(ip, "sinfo --noheader --Node --format='%N %T'").stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _wait_idle(node_ssh, ip, timeout=90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = _sinfo(node_ssh, ip)
        if states == {n: "idle" for n in NODE_NAMES} or time.monotonic() > deadline:
            return states
        time.sleep(2)


def test_sinfo_shows_three_idle_nodes_on_every_node(cluster, bootstrapped_cluster, node_ssh):
    for _name, ip in bootstrapped_cluster.info.nodes:
        assert _wait_idle(node_ssh, ip) == {n: "idle" for n in NODE_NAMES}
    # One MUNGE key everywhere, the cluster's, readable by munge only.
    key = cluster_state_dir(cluster.cluster_name) / "munge.key"
    want = hashlib.sha256(key.read_bytes()).hexdigest()
    for _name, ip in bootstrapped_cluster.info.nodes:
        out = node_ssh(ip, "stat -c '%a %U' /etc/munge/munge.key; "
                       "sha256sum /etc/munge/munge.key").stdout.split()
        assert out[:3] == ["400", "munge", want], out


def test_validate_flags_a_drained_node_with_slurms_reason(cluster, bootstrapped_cluster,
                                                          node_ssh):
    ip1 = bootstrapped_cluster.info.nodes[0][1]
    results = slurm_checks.run_slurm_checks(cluster)
    assert [r.to_dict() for r in results if r.status != "pass"] == []
    assert len(results) == 1 + 2 * len(NODE_NAMES)
    node_ssh(ip1, "scontrol update nodename=node3 state=drain reason='disk check'")
    try:
        by = {(r.node, r.check): r for r in slurm_checks.run_slurm_checks(cluster)}
        drained = by[("node3", "slurm_state")]
        assert drained.status == "fail" and "disk check" in drained.message, drained
    finally:
        node_ssh(ip1, "scontrol update nodename=node3 state=resume")
    assert _wait_idle(node_ssh, ip1) == {n: "idle" for n in NODE_NAMES}


def test_sbatch_accepts_the_script(cluster, tmp_path):
    run_id = "slurm-test-only"
    module, module_args, files = launch.trainer_invocation(TINY)
    script = tmp_path / slurm.SCRIPT_NAME
    script.write_text(slurm.sbatch_script(cluster, module, module_args, run_id=run_id,
                                          options=slurm.SlurmOptions(time_limit="10")))
    launch.ship(cluster, run_id, {slurm.SCRIPT_NAME: script})
    remote = launch.remote_run_dir(cluster.nodes[0], run_id) / slurm.SCRIPT_NAME
    _, out = slurm.submit(cluster, remote, test_only=True)
    assert "to start at" in out and "node[1-3]" in out, out


def test_train_through_slurm_lowers_the_loss(cluster, bootstrapped_cluster, node_ssh,
                                             tmp_path, capsys):
    started = time.monotonic()
    result = slurm.train(cluster, TINY, runs_dir=tmp_path, timeout_s=600)
    print(f"tiny.toml through Slurm: {time.monotonic() - started:.1f} s")
    assert result.last_loss < result.first_loss
    assert result.summary["world_size"] == 3     # what the trainer saw, not what we asked
    (log,) = (result.run_dir / "logs").glob("slurm-*.log")
    assert "step 1/" in log.read_text()
    assert "submitted Slurm job" in capsys.readouterr().out
    # One torchrun per node, each with its log directory under the run.
    for name, ip in bootstrapped_cluster.info.nodes:
        node_ssh(ip, f"test -d /opt/dsk/runs/{result.run_dir.name}/torchrun-logs/{name}")


def test_scancel_leaves_nothing_running(cluster, bootstrapped_cluster, node_ssh, tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n")
    run_id = "slurm-scancel"
    script = tmp_path / slurm.SCRIPT_NAME
    script.write_text(slurm.sbatch_script(cluster, "sleeper", [], run_id=run_id))
    launch.ship(cluster, run_id, {slurm.SCRIPT_NAME: script, "sleeper.py": sleeper})
    job_id, _ = slurm.submit(cluster, launch.remote_run_dir(cluster.nodes[0], run_id)
                             / slurm.SCRIPT_NAME)
    marker = launch.run_marker(run_id)
    count = f"grep -lsxzF -- {marker} /proc/[0-9]*/environ | wc -l"
    nodes = bootstrapped_cluster.info.nodes
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(int(node_ssh(ip, count).stdout) >= 2 for _n, ip in nodes):
                break   # torchrun and its worker on every node
            time.sleep(2)
        else:
            pytest.fail(f"job {job_id} did not start on every node: "
                        f"{slurm.job_state(cluster, job_id)}")
        slurm.cancel(cluster, job_id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = {n: int(node_ssh(ip, count).stdout) for n, ip in nodes}
            state = slurm.job_state(cluster, job_id)
            if not any(left.values()) and state is not None and not state.active:
                break
            time.sleep(2)
        assert left == {n: 0 for n in NODE_NAMES}
        assert state.state == "CANCELLED", state
    finally:
        slurm.cancel(cluster, job_id)
    assert _wait_idle(node_ssh, nodes[0][1]) == {n: "idle" for n in NODE_NAMES}


def test_second_bootstrap_changes_nothing(cluster, tmp_path):
    # The slurm concern only: the others are the session's bootstrap, whose second run
    # test_bootstrap.py checks, and turning Slurm on changes none of their variables.
    started = time.monotonic()
    result = run_playbook("site.yml", cluster, command="bootstrap", runs_dir=tmp_path,
                          console=_quiet(), tags=["slurm"])
    print(f"idempotent re-run with Slurm: {time.monotonic() - started:.1f} s")
    assert result.ok
    changed = {host: counts.get("changed", 0) for host, counts in result.recap.items()}
    assert changed == {n: 0 for n in NODE_NAMES}
