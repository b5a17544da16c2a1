"""files.py: files written whole and flushed to disk; run directories private whatever
the umask (directories 0700, files 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from helpers import REPO, loose_paths, umask

from dsk_provision import files
from dsk_provision.rundir import new_run_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_file_fsyncs_the_file_before_the_rename_and_the_directory_after(
        tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "state.json"
    files.write_file(target, "{}\n")
    assert calls == [("fsync", "file"), ("replace", "state.json"), ("fsync", "dir")]
    assert target.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_write_file_keeps_its_mode_and_follows_the_umask_for_parents(tmp_path):
    with umask(0o022):
        files.write_file(tmp_path / "a" / "b" / "Release", "x", 0o644)
    assert mode(tmp_path / "a" / "b" / "Release") == 0o644
    assert mode(tmp_path / "a") == 0o755


def test_private_writes_ignore_a_permissive_umask(tmp_path):
    with umask(0o000):
        files.write_private(tmp_path / "run" / "perf" / "node1.json", "{}")
        with files.open_private(tmp_path / "run" / "hosts" / "node1.log") as fh:
            fh.write("line\n")
        with files.open_private(tmp_path / "run" / "hosts" / "node1.log", "w") as fh:
            fh.write("again\n")
        files.make_private_dir(tmp_path / "run" / "steps" / "one")
    assert loose_paths(tmp_path / "run") == []
    assert mode(tmp_path / "run" / "perf" / "node1.json") == 0o600
    assert mode(tmp_path / "run" / "steps" / "one") == 0o700
    assert (tmp_path / "run" / "hosts" / "node1.log").read_text() == "again\n"
    with pytest.raises(ValueError):
        files.open_private(tmp_path / "run" / "x", "r")


def test_make_private_tree_closes_down_what_others_wrote(tmp_path):
    with umask(0o000):
        (tmp_path / "artifacts" / "job_events").mkdir(parents=True)
        (tmp_path / "artifacts" / "stdout").write_text("out")
        script = tmp_path / "artifacts" / "command"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
        (tmp_path / "artifacts" / "link").symlink_to("/etc/hostname")
    files.make_private_tree(tmp_path / "artifacts")
    assert loose_paths(tmp_path / "artifacts") == []
    assert mode(script) == 0o700  # the owner keeps what it had
    assert mode(Path("/etc/hostname")) & 0o044  # the link was not followed


def test_run_directories_are_private_whatever_the_umask(tmp_path):
    with umask(0o000):
        run_dir = new_run_dir("validate", tmp_path / ".dsk" / "runs")
    assert mode(run_dir) == 0o700
    assert mode(tmp_path / ".dsk" / "runs") == 0o700
    assert mode(tmp_path / ".dsk") == 0o700


def test_node_facts_are_written_private_on_the_control_node():
    tasks = yaml.safe_load((REPO / "roles" / "health_check" / "tasks" / "main.yml").read_text())
    modes = {t["name"]: (t.get("ansible.builtin.file") or t.get("ansible.builtin.copy") or {})
             .get("mode") for t in tasks}
    assert modes["Make the facts directory on the control node"] == "0700"
    assert modes["Write the facts to the run directory on the control node"] == "0600"
