"""run_playbook for real: ansible-runner against localhost with a local connection.

The playbook (fixtures/runner_play.yml) writes only under tmp_path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import loose_paths, umask
from rich.console import Console

from dsk_provision.errors import RunFailed
from dsk_provision.inventory import load_inventory
from dsk_provision.runner import failure_message, run_playbook

PLAY = str(Path(__file__).parent / "fixtures" / "runner_play.yml")
SECRET = "s3cr3t-value-never-printed"


def _inventory(tmp_path: Path, hosts: dict[str, str]) -> Path:
    lines = [
        "all:",
        "  vars:",
        "    dsk_gpus_per_node: 0",
        "    ansible_connection: local",
        f"    ansible_python_interpreter: {sys.executable}",
        f"    ansible_remote_tmp: {tmp_path}/remote-tmp",
        f"    ansible_control_path_dir: {tmp_path}/cp",
        f"    dsk_test_dir: {tmp_path}",
        f"    dsk_test_secret: {SECRET}",
        "  children:",
        "    nodes:",
        "      hosts:",
    ]
    lines += [f"        {name}: {{{spec}}}" for name, spec in hosts.items()]
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "hosts.yml").write_text("\n".join(lines) + "\n")
    return inv


def _console(tmp_path: Path) -> tuple[Console, Path]:
    log = tmp_path / "console.txt"
    return Console(file=log.open("w"), width=120, force_terminal=False), log


def test_successful_run_records_events_recap_and_host_log(tmp_path):
    inv = load_inventory(_inventory(tmp_path, {"localhost": "ansible_host: 127.0.0.1"}))
    console, log = _console(tmp_path)
    with umask(0o000):  # the run directory is private whatever the umask
        result = run_playbook(PLAY, inv, command="unit", runs_dir=tmp_path / "runs",
                              console=console)
    console.file.close()

    assert result.rc == 0 and result.ok
    assert result.recap["localhost"]["changed"] == 1  # the marker file
    assert result.recap["localhost"]["ok"] == 3
    assert result.recap["localhost"]["skipped"] == 3
    assert result.recap["localhost"]["failed"] == 0
    assert not result.failed and not result.unreachable
    assert (tmp_path / "marker.txt").read_text() == "hello\n"

    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.endswith("-unit")
    events = list((run_dir / "ansible" / "artifacts" / "unit" / "job_events").glob("*.json"))
    kinds = {json.loads(e.read_text())["event"] for e in events}
    assert {"playbook_on_start", "runner_on_ok", "playbook_on_stats"} <= kinds
    host_log = (run_dir / "hosts" / "localhost.log").read_text()
    assert "changed     Write a marker file" in host_log
    assert "skipped     Fail when asked" in host_log
    recap = json.loads((run_dir / "recap.json").read_text())
    assert recap["recap"]["localhost"]["changed"] == 1
    assert loose_paths(run_dir) == []

    out = log.read_text()  # plain lines when not a terminal: one per task that changed
    assert "  changed     Write a marker file: changed 1 (localhost) [" in out
    assert "Read it back" not in out  # ok everywhere: counted in its play's line only
    assert "  done: 6 task(s) in " in out and ": ok 2, changed 1, skipped 3" in out
    assert "recap" in out and "unreachable" in out
    # A role's skip reason reaches the console, not only the event files.
    assert "note (localhost): Skipping the widget: no widget on localhost" in out
    # The record of the run: what --json prints and `runs` reads.
    assert recap["command"] == "unit" and recap["cluster"] == inv.cluster_name
    assert recap["hosts"]["localhost"]["changed_tasks"] == ["Write a marker file"]
    assert result.record == recap
    # ... and `runs list` reads it back
    from dsk_provision.runs import list_runs

    (listed,) = list_runs(tmp_path / "runs")
    assert (listed.name, listed.command, listed.cluster, listed.result) == (
        run_dir.name, "unit", inv.cluster_name, "ok")
    assert listed.duration_s == result.elapsed_s


def test_failures_raise_run_failed_naming_hosts_and_hide_no_log_data(tmp_path):
    inv = load_inventory(_inventory(tmp_path, {
        "alpha": "ansible_host: 127.0.0.1, dsk_test_fail: true",
        "beta": "ansible_host: 127.0.0.2, dsk_test_fail_secret: true",
        "gamma": "ansible_host: 127.0.0.1, ansible_port: 1, ansible_connection: ssh",
    }))
    console, log = _console(tmp_path)
    with pytest.raises(RunFailed) as info:
        run_playbook(PLAY, inv, command="unit", runs_dir=tmp_path / "runs", console=console)
    console.file.close()

    err = info.value
    assert sorted(err.nodes) == ["alpha", "beta", "gamma"]
    assert err.record["hosts"]["alpha"]["failure"] == \
        "Fail when asked: deliberate failure on alpha"
    # each failure was on the console with its message, as it happened
    out = log.read_text()
    assert "  FAILED alpha: Fail when asked: deliberate failure on alpha" in out
    assert "  UNREACHABLE gamma: " in out
    # `runs show` finds the failures in the run's record
    from dsk_provision.runs import failures, find_run

    run = find_run(None, tmp_path / "runs")
    assert run.result == "failed"
    assert ("alpha", "Fail when asked: deliberate failure on alpha") in failures(run)
    assert any(host == "gamma" and what.startswith("unreachable: ")
               for host, what in failures(run))
    text = str(err)
    assert "alpha: Fail when asked: deliberate failure on alpha" in text
    assert "beta: Handle a secret: output hidden (no_log: true)" in text
    assert "gamma: unreachable:" in text
    assert err.exit_code == 1

    run_dir = next((tmp_path / "runs").iterdir())
    for path in [log, *run_dir.rglob("*")]:
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert "failed      Fail when asked" in (run_dir / "hosts" / "alpha.log").read_text()
    recap = json.loads((run_dir / "recap.json").read_text())["recap"]
    assert recap["alpha"]["failed"] == 1 and recap["beta"]["failed"] == 1
    assert recap["gamma"]["unreachable"] == 1


def test_failure_message_never_reveals_censored_results():
    censored = {"censored": "the output has been hidden", "_ansible_no_log": True}
    assert failure_message(censored) == "output hidden (no_log: true)"
    looped = {"msg": "One or more items failed",
              "results": [{"failed": False, "msg": "fine"},
                          {"failed": True, "_ansible_no_log": True, "msg": "password=x"}]}
    assert failure_message(looped) == "output hidden (no_log: true)"
    assert failure_message({"msg": "non-zero return code", "stderr": "a\nno space left"}) == \
        "non-zero return code: no space left"


def test_run_dirs_are_unique_and_honour_env(tmp_path, monkeypatch):
    from dsk_provision.rundir import new_run_dir

    first = new_run_dir("bootstrap", tmp_path)
    second = new_run_dir("bootstrap", tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.endswith("-bootstrap")
    assert len(first.name.split("-")[0]) == 8 and len(first.name.split("-")[1]) == 6
    monkeypatch.setenv("DSK_RUNS_DIR", str(tmp_path / "env"))
    assert new_run_dir("validate").parent == tmp_path / "env"
    monkeypatch.delenv("DSK_RUNS_DIR")
    monkeypatch.chdir(tmp_path)
    assert new_run_dir("train").parent == tmp_path / ".dsk" / "runs"


def test_missing_playbook_is_an_environment_problem(tmp_path):
    from dsk_provision.errors import EnvironmentProblem

    inv = load_inventory(_inventory(tmp_path, {"localhost": "ansible_host: 127.0.0.1"}))
    with pytest.raises(EnvironmentProblem):
        run_playbook("no-such-playbook.yml", inv, command="unit", runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing created before the playbook is found
