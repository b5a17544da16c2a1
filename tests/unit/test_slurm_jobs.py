"""Slurm jobs as named jobs and the lifecycle with Slurm on, without a cluster: Slurm's
states as the jobs commands name them, the job's output labelled per node and rank, the
record on the control node, the jobs commands' choice of Slurm for a recorded name, and
cordon/uncordon draining and resuming the node in Slurm."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from test_slurm_launch import _inventory_file
from test_slurm_launch import inventory as slurm_inventory

from dsk_provision import jobs, lifecycle, slurm, slurmjobs
from dsk_provision.errors import RunFailed
from dsk_provision.inventory import load_inventory

HOSTS = """\
---
all:
  vars:
    dsk_cluster_name: sj
    dsk_gpus_per_node: 0
    dsk_slurm_enabled: {enabled}
  children:
    nodes:
      hosts:
        n1: {{ansible_host: 10.9.0.1}}
        n2: {{ansible_host: 10.9.0.2}}
"""


@pytest.mark.parametrize(("slurm_state", "stop_requested", "want"), [
    ("PENDING", False, "pending"),
    ("CONFIGURING", False, "running"),
    ("RUNNING", False, "running"),
    ("COMPLETING", False, "stopping"),
    ("COMPLETED", False, "finished"),
    ("CANCELLED", False, "stopped"),
    ("CANCELLED by 0", False, "stopped"),        # sacct's spelling
    ("FAILED", False, "failed"),
    ("NODE_FAIL", False, "failed"),
    ("TIMEOUT", False, "failed"),
    ("OUT_OF_MEMORY", False, "failed"),
    ("RUNNING", True, "stopping"),
    ("PENDING", True, "stopping"),
    ("FAILED", True, "stopped"),                 # a rank that died of the stop's SIGTERM
    ("COMPLETED", True, "stopped"),
    ("", False, "unknown"),
    ("SOMETHING_NEW", False, "unknown"),
])
def test_slurm_states_map_to_the_jobs_states(slurm_state, stop_requested, want):
    assert slurmjobs.job_state_name(slurm_state, stop_requested) == want


def test_the_launcher_and_the_jobs_commands_agree_on_which_states_are_under_way():
    # a held requeue or a stopped job is still under way: the launcher's follow loop
    # keeps waiting on it, and the jobs commands count it as active
    import re

    from dsk_provision import slurmctl

    waited_on = re.search(r"JobState=\(([^)]*)\) ",
                          slurmctl.follow_command("/r/out", "7")).group(1).split("|")
    for state in [*slurmctl.STATES, "SOMETHING_NEW"]:
        job = slurmctl.JobState(state, state, "", "", "", "")
        assert job.active == slurmjobs.active(state) == (state in waited_on), state
    assert {"REQUEUE_HOLD", "STOPPED"} <= slurmctl.ACTIVE_STATES


def test_only_pending_running_and_ending_jobs_are_active():
    assert [s for s in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED", "CANCELLED",
                        "FAILED", "TIMEOUT") if slurmjobs.active(s)] == [
        "PENDING", "RUNNING", "COMPLETING"]


def test_output_lines_are_labelled_with_node_and_rank():
    nodes = ["node1", "node2", "node3"]

    def show(line, **kw):
        return slurmjobs.label_filter(line, nodes, 2, **kw)

    assert show("0: [default0]:step 1/20 loss 5.1") == "[node1 rank 0] step 1/20 loss 5.1"
    assert show("2: [default1]:step 1/20") == "[node3 rank 5] step 1/20"
    # srun pads the label when there are ten tasks or more.
    assert show(" 1: [default0]:x") == "[node2 rank 2] x"
    # torchrun's own lines carry no rank; Slurm's own lines no label.
    assert show("1: WARNING:torch.distributed.run:") == "[node2] WARNING:torch.distributed.run:"
    assert show("slurmstepd: error: *** JOB 7 CANCELLED ***") == \
        "slurmstepd: error: *** JOB 7 CANCELLED ***"
    # --node and --rank leave the others out.
    assert show("0: [default1]:a", node="node2") is None
    assert show("1: [default1]:a", node="node2") == "[node2 rank 3] a"
    assert show("1: [default1]:a", rank=3) == "[node2 rank 3] a"
    assert show("1: [default0]:a", rank=3) is None
    assert show("1: torchrun line", rank=3) is None
    assert show("unlabelled", node="node1") is None


def test_sacct_rows_are_read_by_job_id():
    text = "41|COMPLETED|0:0|node[1-2]|None\n42|CANCELLED by 0|0:15|node[1-3]|None\n"
    assert slurmjobs.parse_sacct(text, "42") == {
        "state": "CANCELLED", "exit_code": "0:15", "nodes": "node[1-3]", "reason": "None"}
    assert slurmjobs.parse_sacct(text, "43") is None
    assert slurmjobs.parse_sacct("", "41") is None


def test_the_record_is_private_and_read_back(tmp_path):
    inv = slurm_inventory(tmp_path)
    job = slurmjobs.SlurmJob(name="run-a", job_id="17", run_id="20260101-000000-train",
                             remote_dir="/opt/dsk/runs/20260101-000000-train",
                             nproc_per_node=8, submitted=1.0)
    slurmjobs.save(inv, job)
    assert slurmjobs.load(inv, "run-a") == job
    assert slurmjobs.load(inv, "run-b") is None
    assert [j.name for j in slurmjobs.records(inv)] == ["run-a"]
    path = next(Path(p) for p in (slurmjobs._record_dir(inv)).glob("*.json"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(job.output) == "/opt/dsk/runs/20260101-000000-train/slurm-17.out"


def test_jobs_commands_hand_a_recorded_slurm_job_to_slurm(tmp_path, monkeypatch):
    inv = slurm_inventory(tmp_path)
    job = slurmjobs.SlurmJob(name="run-a", job_id="17", run_id="r", remote_dir="/opt/dsk/runs/r",
                             nproc_per_node=1, submitted=1.0)
    slurmjobs.save(inv, job)
    calls = []
    monkeypatch.setattr(slurmjobs, "status", lambda i, j, **kw: calls.append(("status", j.job_id)))
    monkeypatch.setattr(slurmjobs, "stop", lambda i, j, **kw: calls.append(("stop", kw["grace_s"])))
    monkeypatch.setattr(slurmjobs, "print_logs",
                        lambda i, j, **kw: calls.append(("logs", kw["node"])) or 0)
    jobs.job_status(inv, "run-a")
    jobs.stop_job(inv, "run-a", grace_s=5)
    jobs.print_logs(inv, "run-a", node="node2")
    assert calls == [("status", "17"), ("stop", 5), ("logs", "node2")]


def test_sbatch_script_names_the_job(tmp_path):
    inv = slurm_inventory(tmp_path)
    named = slurm.sbatch_script(inv, "trainer.train", [], run_id="r1", job_name="my-run")
    assert "#SBATCH --job-name=my-run\n" in named
    assert "#SBATCH --job-name=dsk-r1\n" in slurm.sbatch_script(inv, "trainer.train", [],
                                                                 run_id="r1")


def test_drain_and_resume_commands_quote_the_reason():
    assert slurm.drain_command("node2", "GPU 3 Xid 79") == \
        "scontrol update nodename=node2 state=drain reason='GPU 3 Xid 79'"
    assert slurm.drain_command("node2", "it's hot") == \
        "scontrol update nodename=node2 state=drain reason='it'\"'\"'s hot'"
    assert slurm.drain_command("node2", None) == "scontrol update nodename=node2 state=resume"


def _inv(tmp_path, enabled: bool):
    directory = tmp_path / "inv"
    directory.mkdir(exist_ok=True)
    (directory / "hosts.yml").write_text(HOSTS.format(enabled=str(enabled).lower()))
    return load_inventory(directory)


def test_cordon_drains_in_slurm_and_uncordon_resumes(tmp_path):
    calls = []
    inv = lifecycle.cordon(_inv(tmp_path, True), "n2", "GPU 3 Xid 79", say=lambda s: None,
                           drain=lambda i, name, reason: calls.append((name, reason)))
    assert inv.node("n2").cordoned == "GPU 3 Xid 79"
    assert calls == [("n2", "GPU 3 Xid 79")]
    inv = lifecycle.cordon(inv, "n2", None, say=lambda s: None,
                           drain=lambda i, name, reason: calls.append((name, reason)))
    assert inv.node("n2").cordoned is None and calls[-1] == ("n2", None)


def test_cordon_without_slurm_touches_no_slurm(tmp_path):
    def drain(*args):
        raise AssertionError("Slurm is off")

    inv = lifecycle.cordon(_inv(tmp_path, False), "n2", "disk", say=lambda s: None, drain=drain)
    assert inv.node("n2").cordoned == "disk"


def test_a_drain_that_fails_says_the_cordon_is_written_and_how_to_finish(tmp_path):
    def drain(*args):
        raise RunFailed("scontrol on n1 could not drain n2 (exit 1): Unable to contact "
                        "slurm controller", nodes=["n1"])

    with pytest.raises(RunFailed) as err:
        lifecycle.cordon(_inv(tmp_path, True), "n2", "disk", say=lambda s: None, drain=drain)
    assert "n2 is cordoned in" in err.value.message and "not yet in Slurm" in err.value.message
    assert "nodes cordon" in err.value.hint
    assert load_inventory(tmp_path / "inv").node("n2").cordoned == "disk"


def test_the_slurm_launcher_names_jobs_and_refuses_restarts(tmp_path):
    from typer.testing import CliRunner

    from dsk_provision.cli import app

    tiny = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny.toml"
    hosts = _inventory_file(tmp_path, dsk_launcher="slurm")
    result = CliRunner().invoke(app, ["train", "-i", str(hosts), "--config", str(tiny),
                                      "--dry-run", "--name", "exp1"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --job-name=exp1\n" in result.output
    result = CliRunner().invoke(app, ["train", "-i", str(hosts), "--config", str(tiny),
                                      "--max-restarts", "1"])
    assert result.exit_code == 2 and "--max-restarts" in result.output, result.output
    result = CliRunner().invoke(app, ["train", "-i", str(hosts), "--config", str(tiny),
                                      "--dry-run", "--name", "bad name"])
    assert result.exit_code == 2 and "not a job name" in result.output, result.output
