"""The slurm role's configuration, rendered by Ansible from an inventory and the nodes'
slurmd -C facts (no node is contacted): node lines, GPUs as GRES with their device
files, partitions from inventory groups, nodes outside the play from what was recorded;
and the role's switch and argument specs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from helpers import REPO, ROLES, run_play, run_role

ROLE = ROLES / "slurm"


def _hw(cpus: int, memory: int, gpus: int = 0) -> dict:
    return {"CPUs": cpus, "Boards": 1, "SocketsPerBoard": 1, "CoresPerSocket": cpus,
            "ThreadsPerCore": 1, "RealMemory": memory, "Gpus": gpus}


def render(tmp_path: Path, hosts: dict, *, play_hosts: str = "nodes", groups: dict | None = None,
           recorded: dict | None = None, extra: dict | None = None) -> dict[str, str]:
    """slurm.conf and gres.conf as the role's templates render them on the first play host,
    with `slurm_node_hw` set on the play's hosts from their 'hw' entry in `hosts`."""
    state = tmp_path / "state"
    state.mkdir()
    if recorded is not None:
        (state / "slurm_nodes.json").write_text(json.dumps(recorded))
    inventory = {"all": {"vars": {"ansible_connection": "local",
                                  "ansible_python_interpreter": sys.executable,
                                  "dsk_cluster_name": "demo", "dsk_gpus_per_node": 0},
                         "children": {"nodes": {"hosts": {
                             name: {k: v for k, v in spec.items() if k != "hw"}
                             for name, spec in hosts.items()}},
                             **(groups or {})}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    out = tmp_path / "out"
    out.mkdir()
    play = [{
        "name": "Render", "hosts": play_hosts, "gather_facts": False,
        "vars_files": [str(ROLES / "dsk_defaults/defaults/main.yml"),
                       str(ROLE / "defaults/main.yml"), str(ROLE / "vars/main.yml")],
        "tasks": [
            {"name": "Facts", "ansible.builtin.set_fact": {
                "slurm_node_hw": "{{ dsk_test_hw[inventory_hostname] }}"},
             "when": "dsk_test_hw[inventory_hostname] is defined"},
            {"name": "Render", "ansible.builtin.copy": {
                "content": "{{ lookup('ansible.builtin.template',"
                           " dsk_test_tpl ~ '/' ~ item ~ '.j2') }}",
                "dest": f"{out}/{{{{ item }}}}"},
             "loop": ["slurm.conf", "gres.conf"], "run_once": True, "delegate_to": "localhost"},
        ]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    variables = {"dsk_test_tpl": str(ROLE / "templates"), "dsk_slurm_enabled": True,
                 "dsk_cluster_state_dir": str(state),
                 "dsk_test_hw": {n: s["hw"] for n, s in hosts.items() if "hw" in s},
                 **(extra or {})}
    run_play(tmp_path, variables)
    return {name: (out / name).read_text() for name in ("slurm.conf", "gres.conf")}


def lines(conf: str, key: str) -> dict[str, dict[str, str]]:
    """The `key=NAME a=b ...` lines of a Slurm configuration file, by NAME."""
    found = {}
    for line in conf.splitlines():
        if line.startswith(f"{key}="):
            fields = dict(f.split("=", 1) for f in line.split())
            found[fields[key]] = fields
    return found


def test_nodes_gpus_and_partitions_come_from_the_inventory_and_facts(tmp_path):
    conf = render(tmp_path, {
        "gpu1": {"ansible_host": "10.0.0.11", "hw": _hw(64, 515000, gpus=8)},
        "gpu2": {"ansible_host": "10.0.0.12", "hw": _hw(64, 515000, gpus=8)},
        "cpu1": {"ansible_host": "10.0.0.13", "hw": _hw(16, 64000)},
    }, groups={"h100": {"hosts": {"gpu1": None, "gpu2": None}},
               "other": {"hosts": {"gpu1": None, "elsewhere": None}}})
    slurm = conf["slurm.conf"]
    assert "SlurmctldHost=gpu1(10.0.0.11)" in slurm.splitlines()
    nodes = lines(slurm, "NodeName")
    assert sorted(nodes) == ["cpu1", "gpu1", "gpu2"]
    assert nodes["gpu1"]["Gres"] == "gpu:8" and nodes["gpu1"]["CPUs"] == "64"
    assert nodes["gpu2"]["NodeAddr"] == "10.0.0.12"
    assert nodes["gpu1"]["RealMemory"] == "515000"
    assert "Gres" not in nodes["cpu1"] and nodes["cpu1"]["CPUs"] == "16"
    parts = lines(slurm, "PartitionName")
    assert parts["main"]["Nodes"] == "gpu1,gpu2,cpu1" and parts["main"]["Default"] == "YES"
    # A group of nodes is a partition; one with a host outside the cluster is not.
    assert parts["h100"]["Nodes"] == "gpu1,gpu2" and "Default" not in parts["h100"]
    assert "other" not in parts
    gres = lines(conf["gres.conf"], "NodeName")
    assert gres == {n: {"NodeName": n, "Name": "gpu", "File": "/dev/nvidia[0-7]"}
                    for n in ("gpu1", "gpu2")}


def test_a_node_outside_the_play_keeps_its_recorded_line(tmp_path):
    conf = render(tmp_path, {
        "node1": {"hw": _hw(4, 8000)},
        "node2": {"hw": _hw(4, 8000)},
        "node3": {},   # not in this run: its line comes from the control node's record
    }, play_hosts="node1:node2", recorded={"node3": _hw(2, 4000, gpus=1), "gone": _hw(1, 1)},
        extra={"dsk_slurm_controller": "node2", "slurm_default_partition": "batch"})
    slurm = conf["slurm.conf"]
    nodes = lines(slurm, "NodeName")
    assert sorted(nodes) == ["node1", "node2", "node3"]   # "gone" left the inventory
    assert nodes["node3"]["CPUs"] == "2" and nodes["node3"]["Gres"] == "gpu:1"
    assert nodes["node1"]["NodeAddr"] == "node1"
    assert "SlurmctldHost=node2(node2)" in slurm.splitlines()
    assert lines(slurm, "PartitionName")["batch"]["Default"] == "YES"
    assert lines(conf["gres.conf"], "NodeName")["node3"]["File"] == "/dev/nvidia[0-0]"


def test_the_sandbox_settings_reach_slurm_conf(tmp_path):
    conf = render(tmp_path, {"node1": {"hw": _hw(2, 2000)}},
                  extra={"slurm_proctrack_type": "proctrack/linuxproc",
                         "slurm_task_plugin": "task/none"})
    slurm = conf["slurm.conf"].splitlines()
    assert "ProctrackType=proctrack/linuxproc" in slurm and "TaskPlugin=task/none" in slurm


def test_the_role_skips_saying_why_unless_enabled(tmp_path):
    proc = run_role(tmp_path, "slurm", {}, host_vars={"dsk_gpus_per_node": 0})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Skipping Slurm: dsk_slurm_enabled is false" in out
    assert "Setup |" not in out


def test_argument_specs_reject_a_bad_plugin_before_any_task(tmp_path):
    proc = run_role(tmp_path, "slurm", {"slurm_proctrack_type": "proctrack/none"},
                    host_vars={"dsk_gpus_per_node": 0})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Validation of arguments failed" in out and "slurm_proctrack_type" in out, out[-3000:]


def test_the_role_runs_after_every_other_concern():
    site = yaml.safe_load((REPO / "playbooks/site.yml").read_text())
    assert site[-1]["ansible.builtin.import_playbook"] == "components/slurm.yml"
