"""The slurm role's configuration step (tasks/conf.yml) run locally against a directory
that stands in for /etc/slurm: what it writes when a node comes or goes, and whether it
asks for `scontrol reconfigure` or for a restart of the daemons."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROLES, run_play

ROLE = ROLES / "slurm"
HW = {"CPUs": 4, "Boards": 1, "SocketsPerBoard": 1, "CoresPerSocket": 4,
      "ThreadsPerCore": 1, "RealMemory": 8000, "Gpus": 0}
# The role writes its files owned by root.
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files owned by root)")


def apply(tmp_path: Path, nodes: list[str], conf_dir: Path, *, removed=(),
          groups: dict | None = None) -> bool | None:
    """Run conf.yml on the first node with every node's hardware recorded; the decision
    its handler topic received (None: the files did not change, nothing was notified)."""
    work = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    work.mkdir()
    state = work / "state"
    state.mkdir()
    (state / "slurm_nodes.json").write_text(json.dumps({n: HW for n in nodes}))
    decision = work / "decision"
    # Outside the role, the template module and lookup search beside the playbook.
    (work / "templates").symlink_to(ROLE / "templates")
    inventory = {"all": {"vars": {"ansible_connection": "local",
                                  "ansible_python_interpreter": sys.executable,
                                  "dsk_cluster_name": "demo", "dsk_gpus_per_node": 0},
                         "children": {"nodes": {"hosts": {
                             n: {"ansible_host": f"10.0.0.{i + 1}"}
                             for i, n in enumerate(nodes)}}, **(groups or {})}}}
    (work / "hosts.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    play = [{
        "name": "Configuration", "hosts": nodes[0], "gather_facts": False,
        "vars_files": [str(ROLES / "dsk_defaults/defaults/main.yml"),
                       str(ROLE / "defaults/main.yml"), str(ROLE / "vars/main.yml")],
        "tasks": [{"name": "Configuration",
                   "ansible.builtin.include_tasks": str(ROLE / "tasks/conf.yml")}],
        "handlers": [{"name": "Record the decision", "listen": "Apply the Slurm configuration",
                      "ansible.builtin.copy": {"content": "{{ slurm_conf_restart }}",
                                               "dest": str(decision)}}],
    }]
    (work / "play.yml").write_text(yaml.safe_dump(play))
    variables = {"dsk_slurm_enabled": True, "dsk_cluster_state_dir": str(state),
                 "slurm_conf_dir": str(conf_dir), "dsk_removed_nodes": list(removed)}
    run_play(work, variables)
    return decision.read_text().strip() == "True" if decision.exists() else None


def node_names(conf_dir: Path) -> list[str]:
    return [line.split()[0].split("=", 1)[1]
            for line in (conf_dir / "slurm.conf").read_text().splitlines()
            if line.startswith("NodeName=")]


@root_only
def test_node_set_changes_restart_and_partition_changes_reconfigure(tmp_path):
    conf = tmp_path / "etc-slurm"
    conf.mkdir()
    three, four = ["n1", "n2", "n3"], ["n1", "n2", "n3", "n4"]
    # New files: restart (the daemons read them first at start).
    assert apply(tmp_path, three, conf) is True
    assert node_names(conf) == three
    assert "SlurmctldHost=n1(10.0.0.1)" in (conf / "slurm.conf").read_text()
    # A node added: Slurm 22.05 takes it only on a restart of every daemon.
    assert apply(tmp_path, four, conf) is True
    assert node_names(conf) == four
    # A node on its way out (still in the inventory, named in dsk_removed_nodes): gone
    # from slurm.conf and its partitions, and a restart again. The first node gone, the
    # controller moves to the next.
    assert apply(tmp_path, four, conf, removed=["n1"]) is True
    assert node_names(conf) == ["n2", "n3", "n4"]
    text = (conf / "slurm.conf").read_text()
    assert "SlurmctldHost=n2(10.0.0.2)" in text and "n1" not in text
    # Only a partition's members changed (an inventory group): scontrol reconfigure.
    assert apply(tmp_path, four, conf, removed=["n1"],
                 groups={"fast": {"hosts": {"n2": {}}}}) is False
    assert "PartitionName=fast Nodes=n2 " in (conf / "slurm.conf").read_text()
