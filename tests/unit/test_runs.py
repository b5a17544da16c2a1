"""`dsk-provision runs list|show` and `bootstrap --json`, `--version`: run directories
as the runner, validate and train leave them (recap.json, report.json, summary.json)."""

from __future__ import annotations

import json
import types
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsk_provision import runs
from dsk_provision.cli import app
from dsk_provision.errors import InputError, RunFailed

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventory" / "example"


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _recap(hosts: dict[str, dict], **record) -> dict:
    counts = dict.fromkeys(("ok", "changed", "failed", "unreachable", "skipped", "rescued",
                            "ignored"), 0)
    return {"command": "bootstrap", "cluster": "lab", "state": "finished", "ok": True,
            "rc": 0, "elapsed_s": 95.4, "failed": {}, "unreachable": {}, "running": {},
            "recap": {h: {**counts, **c} for h, c in hosts.items()}, **record}


def _make(root: Path, name: str, files: dict[str, dict] | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    for file, data in (files or {}).items():
        (path / file).write_text(json.dumps(data))
    return path


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _make(root, "20261201-090000-bootstrap", {"recap.json": _recap({"n1": {"ok": 40}})})
    _make(root, "20261201-090000-bootstrap-2", {"recap.json": _recap(
        {"n1": {"ok": 3, "failed": 1}, "n2": {"unreachable": 1}}, ok=False, rc=2,
        elapsed_s=12.0, failed={"n1": "Install packages: no space left on device"},
        unreachable={"n2": "Failed to connect to the host via ssh"})})
    _make(root, "20261202-100000-validate", {"report.json": {
        "command": "validate", "cluster": "lab", "passed": False, "elapsed_s": 301.2,
        "checks": [{"node": "n2", "check": "allreduce_busbw", "status": "fail",
                    "message": "3.1 GB/s < 10 GB/s"},
                   {"node": "n1", "check": "gpu_count", "status": "pass", "message": "8"}]}})
    _make(root, "20261202-110000-train", {"summary.json": {"steps": 40}})
    _make(root, "20261202-120000-bootstrap", {"recap.json": _recap(
        {"n1": {"ok": 5}}, cluster="other", state="interrupted", ok=False, rc=1,
        running={"n1": "Install the pinned versions"})})
    _make(root, "20261203-080000-bootstrap")  # still running, or killed: no record
    (root / "not-a-run").mkdir()
    (root / "20261203-080000-bootstrap.txt").write_text("")
    return root


def test_list_is_newest_first_with_each_kind_of_record(runs_dir):
    listed = runs.list_runs(runs_dir)
    assert [(r.name, r.command, r.cluster, r.result) for r in listed] == [
        ("20261203-080000-bootstrap", "bootstrap", None, "no record"),
        ("20261202-120000-bootstrap", "bootstrap", "other", "interrupted"),
        ("20261202-110000-train", "train", None, "finished"),
        ("20261202-100000-validate", "validate", "lab", "failed"),
        ("20261201-090000-bootstrap-2", "bootstrap", "lab", "failed"),
        ("20261201-090000-bootstrap", "bootstrap", "lab", "ok"),
    ]
    assert listed[-1].started == "2026-12-01 09:00:00" and listed[-1].duration_s == 95.4
    assert [r.name for r in runs.list_runs(runs_dir, command="bootstrap", cluster="lab")] == [
        "20261201-090000-bootstrap-2", "20261201-090000-bootstrap"]
    assert len(runs.list_runs(runs_dir, limit=2)) == 2
    assert runs.list_runs(runs_dir.parent / "none") == []


def test_list_command_prints_a_line_per_run(runs_dir):
    result = _invoke("--runs-dir", str(runs_dir), "runs", "list", "--last", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["STARTED", "DURATION", "COMMAND", "CLUSTER", "RESULT", "RUN"]
    assert len(lines) == 4
    assert lines[3].split() == ["2026-12-02", "11:00:00", "-", "train", "-", "finished",
                                "20261202-110000-train"]
    data = json.loads(_invoke("--runs-dir", str(runs_dir), "runs", "list", "--json",
                              "--command", "validate").stdout)
    assert data == [{"name": "20261202-100000-validate",
                     "path": str(runs_dir / "20261202-100000-validate"),
                     "command": "validate", "cluster": "lab", "started": "2026-12-02 10:00:00",
                     "duration_s": 301.2, "result": "failed"}]


def test_show_gives_recap_failures_and_files(runs_dir):
    (runs_dir / "20261201-090000-bootstrap-2" / "hosts").mkdir()
    result = _invoke("--runs-dir", str(runs_dir), "runs", "show", "20261201-090000-bootstrap-2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.splitlines()[0] == ("20261201-090000-bootstrap-2: bootstrap on lab, started "
                                   "2026-12-01 09:00:00, took 12.0 s: failed")
    assert "│ n1   │  3 │" in out  # the recap, one row per host
    assert "  n1: Install packages: no space left on device" in out
    assert "  n2: unreachable: Failed to connect to the host via ssh" in out
    assert f"  {runs_dir / '20261201-090000-bootstrap-2' / 'recap.json'}" in out
    assert f"  {runs_dir / '20261201-090000-bootstrap-2' / 'hosts'}/" in out

    validate = json.loads(_invoke("--runs-dir", str(runs_dir), "runs", "show", "20261202-10",
                                  "--json").stdout)
    assert validate["failures"] == [{"host": "n2",
                                     "message": "allreduce_busbw: 3.1 GB/s < 10 GB/s"}]
    assert validate["reports"] == [str(runs_dir / "20261202-100000-validate" / "report.json")]

    latest = _invoke("--runs-dir", str(runs_dir), "runs", "show")
    assert latest.output.startswith("20261203-080000-bootstrap: bootstrap, started ")
    stopped = runs.find_run("20261202-12", runs_dir)
    assert runs.failures(stopped) == [("n1", "stopped during Install the pinned versions")]
    assert runs.find_run(str(runs_dir / "20261202-110000-train")).result == "finished"


def test_show_refuses_unknown_and_ambiguous_names(runs_dir, tmp_path):
    with pytest.raises(InputError, match="no run named 'nope'"):
        runs.find_run("nope", runs_dir)
    with pytest.raises(InputError, match="names 2 runs"):
        runs.find_run("20261201-090000", runs_dir)
    # a full name is never ambiguous, even when it starts another
    assert runs.find_run("20261201-090000-bootstrap", runs_dir).result == "ok"
    result = _invoke("--runs-dir", str(tmp_path / "empty"), "runs", "show")
    assert result.exit_code == 2 and "no runs in" in result.output


def test_version_comes_from_the_package_metadata():
    result = _invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"dsk-provision {version('dsk-provision')}\n"


def test_bootstrap_json_prints_the_record_and_sends_progress_to_stderr(monkeypatch):
    import dsk_provision.runner as runner

    record = {"command": "bootstrap", "ok": True, "hosts": {"gpu01": {"changed": 2}}}
    seen = {}

    def run(playbook, inventory, **kw):
        seen["console"] = kw["console"]
        kw["console"].print("progress line")
        return types.SimpleNamespace(record=record)

    monkeypatch.setattr(runner, "run_playbook", run)
    result = _invoke("bootstrap", "-i", str(EXAMPLE), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == record
    assert "progress line" in result.stderr and seen["console"].stderr

    def fail(playbook, inventory, **kw):
        exc = RunFailed("bootstrap failed on 1 host(s): gpu02", nodes=["gpu02"])
        exc.record = {**record, "ok": False}
        raise exc

    monkeypatch.setattr(runner, "run_playbook", fail)
    # The stand-in recorded no host keys, so the nodes are new again: their keys count
    # as pinned here (tests/unit/test_lifecycle_hostkeys.py checks that step).
    import dsk_provision.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "pin_host_keys", lambda *a, **kw: None)
    result = _invoke("bootstrap", "-i", str(EXAMPLE), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ok"] is False
    assert "error: bootstrap failed on 1 host(s): gpu02" in result.stderr
