"""Slurm on the 3-node sandbox: bootstrap with dsk_slurm_enabled from the sandbox's mirror,
sinfo shows three idle nodes, validate reads Slurm's view, sbatch --test-only accepts the
launcher's script, `train --launcher slurm` lowers the loss across the three nodes,
scancel leaves nothing running, and a second bootstrap changes nothing. Then the lifecycle
and the jobs commands with Slurm on: a cordoned node is drained with its reason and resumed
on uncordon, `jobs stop` cancels a running Slurm job with nothing left running, and a
fourth node added from a spare appears in sinfo and in every node's slurm.conf (and goes
again with `nodes remove`).

Uses the session's bootstrapped sandbox: Slurm is turned on in its inventory for this
module and taken off again afterwards (services stopped, packages purged, the inventory
as it was), even when a test fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from dsk_provision import launch, slurm, slurmctl
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


def _wait_started(cluster, job_id, nodes, count: str, node_ssh) -> None:
    """Wait until ``count`` (a shell line printing how many of the job's processes a node
    has) says torchrun and its worker run on every node; fail after 120 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(int(node_ssh(ip, count).stdout) >= 2 for _n, ip in nodes):
            return
        time.sleep(2)
    pytest.fail(f"job {job_id} did not start on every node: "
                f"{slurmctl.job_state(cluster, job_id)}")


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
        _wait_started(cluster, job_id, nodes, count, node_ssh)
        slurmctl.cancel(cluster, job_id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = {n: int(node_ssh(ip, count).stdout) for n, ip in nodes}
            state = slurmctl.job_state(cluster, job_id)
            if not any(left.values()) and state is not None and not state.active:
                break
            time.sleep(2)
        assert left == {n: 0 for n in NODE_NAMES}
        assert state.state == "CANCELLED", state
    finally:
        slurmctl.cancel(cluster, job_id)
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


# --- the lifecycle and the jobs commands with Slurm on (after the second bootstrap, which
# must see the configuration of the first)

@pytest.fixture(scope="module", autouse=True)
def _cli_runs_dir(tmp_path_factory):
    """The CLI's run directories (nodes add, remove) in the session's temporary tree."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DSK_RUNS_DIR", str(tmp_path_factory.mktemp("slurm-cli-runs")))
    yield
    patch.undo()


def _dsk(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.prefix) / "bin" / "dsk-provision"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _ok(*args: str, timeout: float = 900) -> str:
    proc = _dsk(*args, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dsk-provision {' '.join(args)}: {out[-6000:]}"
    return " ".join(out.split())


def _sinfo_reasons(node_ssh, ip) -> dict[str, tuple[str, str]]:
    out = node_ssh(ip, "sinfo --noheader --Node --format='%N|%T|%E'").stdout
    rows = [line.split("|", 2) for line in out.splitlines() if line.strip()]
    return {name: (state, reason) for name, state, reason in rows}


def test_a_cordoned_node_is_drained_with_its_reason_and_resumed(cluster, bootstrapped_cluster,
                                                               node_ssh):
    inv = str(cluster.hosts_file)
    ip1 = bootstrapped_cluster.info.nodes[0][1]
    try:
        out = _ok("nodes", "cordon", "-i", inv, "node2", "--reason", "GPU 3 Xid 79")
        assert "node2 drained in Slurm" in out, out
        state, reason = _sinfo_reasons(node_ssh, ip1)["node2"]
        assert state in ("drained", "draining") and reason == "GPU 3 Xid 79", (state, reason)
        out = _ok("nodes", "uncordon", "-i", inv, "node2")
        assert "node2 resumed in Slurm" in out, out
    finally:
        if load_inventory(cluster.hosts_file).node("node2").cordoned is not None:
            _dsk("nodes", "uncordon", "-i", inv, "node2")
        node_ssh(ip1, "scontrol update nodename=node2 state=resume", check=False)
    assert _wait_idle(node_ssh, ip1) == {n: "idle" for n in NODE_NAMES}


def test_jobs_stop_cancels_a_running_slurm_job(cluster, bootstrapped_cluster, node_ssh,
                                               tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n")
    name = "slurm-sleeper"
    run_dir = tmp_path / "slurm-jobs-stop"
    run_dir.mkdir()
    script = slurm.sbatch_script(cluster, "sleeper", [], run_id=run_dir.name, job_name=name)
    job = slurm.submit_job(cluster, script, name=name, run_dir=run_dir,
                           files={"sleeper.py": sleeper}, nproc_per_node=1)
    count = f"grep -lsxzF -- {launch.run_marker(run_dir.name)} /proc/[0-9]*/environ | wc -l"
    nodes = bootstrapped_cluster.info.nodes
    inv = str(cluster.hosts_file)
    try:
        _wait_started(cluster, job.job_id, nodes, count, node_ssh)
        status = json.loads(_dsk("jobs", "status", "-i", inv, name, "--json").stdout)
        assert status["state"] == "running", status
        assert status["slurm"]["job_id"] == job.job_id and status["slurm"]["nodes"] == NODE_NAMES
        assert all(n["processes"] >= 2 for n in status["nodes"]), status["nodes"]
        listed = json.loads(_dsk("jobs", "list", "-i", inv, "--json").stdout)
        assert {j["name"]: j["state"] for j in listed["jobs"]}.get(name) == "running", listed
        # One line from each node's rank: "[node2 rank 1] sleeping" (the ssh launcher's form).
        deadline = time.monotonic() + 30
        while True:
            logs = _dsk("jobs", "logs", "-i", inv, name).stdout
            shown = {m[1] for m in re.finditer(r"^\[(\S+) rank \d+\] sleeping$", logs, re.M)}
            if shown == set(NODE_NAMES) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert shown == set(NODE_NAMES), logs
        out = _ok("jobs", "stop", "-i", inv, name, "--grace", "10")
        assert f"job {name}: stopped on node1, node2, node3" in out, out
        assert {n: int(node_ssh(ip, count).stdout) for n, ip in nodes} == \
            {n: 0 for n in NODE_NAMES}
        state = slurmctl.job_state(cluster, job.job_id)
        assert state is None or not state.active, state
        status = json.loads(_dsk("jobs", "status", "-i", inv, name, "--json").stdout)
        assert status["state"] == "stopped", status
    finally:
        slurmctl.cancel(cluster, job.job_id)
    assert _wait_idle(node_ssh, nodes[0][1]) == {n: "idle" for n in NODE_NAMES}


def _slurm_conf_nodes(node_ssh, ip) -> list[str]:
    out = node_ssh(ip, "grep -o '^NodeName=[^ ]*' /etc/slurm/slurm.conf").stdout
    return [line.split("=", 1)[1] for line in out.split()]


# A node's full bootstrap and two refreshes of the others (Slurm's daemons restarted each
# time): longer than the suite's 900 s per test on a loaded machine.
@pytest.mark.timeout(2400)
def test_a_fourth_node_joins_slurm_everywhere(cluster, bootstrapped_cluster, node_ssh,
                                             sandbox_name):
    """nodes add: node4 in every node's slurm.conf and in sinfo. The sandbox is put back
    as found (node4 removed, 3 nodes, no spare, the inventory with Slurm on)."""
    from dsk_provision import sandbox

    inv = str(cluster.hosts_file)
    slurm_text = cluster.hosts_file.read_text()
    ip1 = bootstrapped_cluster.info.nodes[0][1]
    started = time.monotonic()
    grown = sandbox.up(sandbox_name, len(NODE_NAMES), spare=1)
    cluster.hosts_file.write_text(slurm_text)   # a new layout rewrites the sandbox's inventory
    ip4 = dict(grown.spare)["node4"]
    try:
        out = _ok("nodes", "add", "-i", inv, "node4", "--host", ip4, "--no-validate")
        print(f"nodes add with Slurm: {time.monotonic() - started:.1f} s")
        assert "1 new node: full bootstrap (node4); 3 existing: trust refresh only" in out
        everyone = [*NODE_NAMES, "node4"]
        for name, ip in [*bootstrapped_cluster.info.nodes, ("node4", ip4)]:
            assert _slurm_conf_nodes(node_ssh, ip) == everyone, name
        deadline = time.monotonic() + 120
        while (states := _sinfo(node_ssh, ip1)) != {n: "idle" for n in everyone} \
                and time.monotonic() < deadline:
            time.sleep(2)
        assert states == {n: "idle" for n in everyone}
        assert _sinfo(node_ssh, ip4) == states
    finally:
        if "node4" in [n.name for n in load_inventory(cluster.hosts_file).nodes]:
            # node4 is destroyed right after: no key rotation for it.
            _dsk("nodes", "remove", "-i", inv, "node4", "--yes", "--keep-key")
        sandbox.up(sandbox_name, len(NODE_NAMES), spare=0)
        cluster.hosts_file.write_text(slurm_text)
        print(f"node4 in and out with Slurm: {time.monotonic() - started:.1f} s")
