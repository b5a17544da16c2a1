"""`status`: rows from probe results, the real probe program run on this machine, the
timeout that keeps a dead node from holding up the table, drift from a check-mode host
log, the last validation from validate's run directories, the table and the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dsk_provision import status
from dsk_provision.cli import app
from dsk_provision.inventory import load_inventory


def _inventory(directory: Path, **host_extra: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hosts = {f"node{i}": {"ansible_host": f"10.0.0.{i}"} for i in (1, 2, 3)}
    for name, values in host_extra.items():
        hosts[name].update(values)
    (directory / "hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_cluster_name": "stat", "dsk_gpus_per_node": 8},
        "children": {"nodes": {"hosts": hosts}}}}))
    return directory / "hosts.yml"


FACTS = {"hostname": "n", "gpus": 8, "driver": "580.95.05", "cuda": "13.0.88",
         "nccl": "2.28.3-1+cuda13.0"}


def _fake_run(answers: dict[str, tuple[int, str, str] | float]):
    """run() for probe_nodes: per address an answer, or seconds to hang (then timeout)."""
    def run(argv, stdin_text, timeout):
        assert "dsk_node_facts" in stdin_text
        answer = answers[argv[-2]]
        if isinstance(answer, float):
            time.sleep(min(answer, timeout))
            return 124, "", f"no answer within {timeout:g} s"
        return answer
    return run


def test_rows_from_answers_timeouts_and_ssh_failures(tmp_path):
    inv = load_inventory(_inventory(tmp_path, node3={"dsk_cordoned": "bad DIMM"}))
    run = _fake_run({"10.0.0.1": (0, json.dumps(FACTS) + "\n", ""),
                     "10.0.0.2": 30.0,
                     "10.0.0.3": (255, "", "ssh: connect to host 10.0.0.3 port 22: "
                                           "No route to host\n")})
    started = time.monotonic()
    rows = status.probe_nodes(inv, timeout=0.5, run=run)
    assert time.monotonic() - started < 5  # the hanging node cost its timeout, no more
    assert [r.name for r in rows] == ["node1", "node2", "node3"]
    one, two, three = rows
    assert one.reachable and (one.gpus, one.driver, one.cuda, one.nccl) == (
        8, "580.95.05", "13.0.88", "2.28.3-1+cuda13.0")
    assert not two.reachable and "no answer within 0.5 s" in two.error
    assert not three.reachable and "No route to host" in three.error
    assert three.cordoned == "bad DIMM"


def test_a_probe_that_runs_but_fails_is_reachable_with_the_reason(tmp_path):
    inv = load_inventory(_inventory(tmp_path))
    row = status.parse_probe(inv.nodes[0], 127, "", "bash: python3: command not found\n")
    assert row.reachable and "python3: command not found" in row.error
    table = status.table_rows(status.ClusterStatus("stat", [row]))
    assert table[0][1].startswith("yes, probe failed (exit 127)")


def test_the_probe_program_is_the_health_check_modules_code_and_runs_here():
    program = status.probe_program("/nonexistent/cuda")
    proc = subprocess.run([sys.executable, "-"], input=program, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.splitlines()[-1])
    assert set(facts) == {"hostname", "gpus", "driver", "cuda", "nccl"}
    assert isinstance(facts["gpus"], int) and facts["cuda"] is None
    # The module's own code, not a copy: a change there reaches status.
    assert "def nccl_package_version(skipped: dict)" in program
    assert "DRIVER_VERSION_FILE = " in program


def test_changed_tasks_from_a_check_mode_host_log():
    log = ("12:00:01 ok          Gather facts\n"
           "12:00:02 changed     Install the cluster private key\n"
           "12:00:03 skipped     Reboot\n"
           "12:00:04 changed     Write /etc/hosts: note text\n"
           "12:00:05 changed     Install the cluster private key\n")
    assert status.changed_tasks(log) == ["Install the cluster private key", "Write /etc/hosts"]
    assert status.changed_tasks("12:00:01 ok          Gather facts\n") == []


def _report(runs: Path, stamp: str, cluster: str, nodes: list[str], fails: dict) -> None:
    directory = runs / f"{stamp}-validate"
    directory.mkdir(parents=True)
    checks = [{"node": n, "check": c, "status": "fail", "message": "x"}
              for n, cs in fails.items() for c in cs]
    checks += [{"node": n, "check": "driver_version", "status": "pass", "message": ""}
               for n in nodes]
    (directory / "report.json").write_text(json.dumps({
        "cluster": cluster, "nodes": nodes, "checks": checks, "passed": not fails,
        "started": f"{stamp[:8]}T{stamp[9:]}"}))


def test_last_validation_is_the_newest_report_of_the_cluster_covering_the_node(tmp_path):
    runs = tmp_path / "runs"
    _report(runs, "20261201-100000", "stat", ["node1", "node2", "node3"],
            {"node3": ["ecc_errors"]})
    _report(runs, "20261202-100000", "stat", ["node1", "node2"], {"node2": ["xid_errors"]})
    _report(runs, "20261203-100000", "other", ["node1"], {"node1": ["nvlink"]})
    (runs / "20261204-100000-validate").mkdir()  # a run that wrote no report
    got = status.last_validations("stat", ["node1", "node2", "node3", "node4"], runs)
    assert got["node1"]["result"] == "pass" and got["node1"]["time"] == "20261202T100000"
    assert got["node2"] == {"result": "fail", "failed": ["xid_errors"],
                            "time": "20261202T100000",
                            "report": str(runs / "20261202-100000-validate/report.json")}
    assert got["node3"]["failed"] == ["ecc_errors"] and got["node3"]["time"].startswith("20261201")
    assert "node4" not in got


def test_table_and_json(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _report(runs, "20261202-100000", "stat", ["node1"], {})
    path = _inventory(tmp_path / "inv", node2={"dsk_cordoned": "repair"})

    real = status.probe_nodes

    def probe_nodes(inventory, nodes=None, *, timeout, run=None):
        return real(inventory, timeout=timeout, run=_fake_run({
            "10.0.0.1": (0, json.dumps(FACTS), ""),
            "10.0.0.2": (0, json.dumps({**FACTS, "gpus": 7}), ""),
            "10.0.0.3": (255, "", "Connection timed out during banner exchange")}))

    monkeypatch.setattr(status, "probe_nodes", probe_nodes)
    out = CliRunner().invoke(app, ["--runs-dir", str(runs), "status", "-i", str(path)])
    assert out.exit_code == 0, out.output
    assert "node3" in out.output
    result = status.cluster_status(load_inventory(path), runs_dir=runs, timeout=1)
    rows = {r[0]: r for r in status.table_rows(result)}
    assert rows["node1"][1:7] == ["yes", "no", "8", "580.95.05", "13.0.88", "2.28.3-1+cuda13.0"]
    assert rows["node1"][7:] == ["not checked", "pass at 20261202T100000"]
    assert rows["node2"][2:4] == ["repair", "7 of 8 declared"] and rows["node2"][8] == "never"
    assert rows["node3"][1] == "no: Connection timed out during banner exchange"
    assert "stat: 2 of 3 node(s) reachable" in out.output

    out = CliRunner().invoke(app, ["--runs-dir", str(runs), "status", "-i", str(path),
                                   "--json"])
    data = json.loads(out.stdout)
    assert data["reachable"] == 2 and data["drift_checked"] is False
    rows = {n["name"]: n for n in data["nodes"]}
    assert rows["node3"]["reachable"] is False and rows["node2"]["cordoned"] == "repair"
    assert rows["node1"]["validation"]["result"] == "pass"


def test_drift_rows(tmp_path):
    inv = load_inventory(_inventory(tmp_path))
    rows = [status.NodeStatus("node1", "a", True, drift=[]),
            status.NodeStatus("node2", "b", True, drift=["Write /etc/hosts"]),
            status.NodeStatus("node3", "c", False, error="no answer")]
    table = status.table_rows(status.ClusterStatus(inv.cluster_name, rows, drift_checked=True))
    assert [r[7] for r in table] == ["none", "1 task(s): Write /etc/hosts", "-"]
