"""Past runs, read back from their run directories (dsk_provision.rundir): what ran, on
which cluster, when, for how long, how it ended, and where its reports are.

A run's record is the file its command writes at the end: ``recap.json`` for a playbook
run (bootstrap and the other commands that go through dsk_provision.runner),
``report.json`` for validate, ``summary.json`` for a training job that finished. A run
without one is still going, or was stopped before it could write it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dsk_provision.errors import InputError
from dsk_provision.rundir import RECAP_FILE, runs_root

REPORT_FILE = "report.json"  # validate's (dsk_provision.validation.report)
SUMMARY_FILE = "summary.json"  # train's, fetched from the node that logged the metrics
_NAME_RE = re.compile(r"^(\d{8}-\d{6})-([a-z0-9][a-z0-9_-]*?)(?:-(\d+))?$")
# Files and folders worth opening in a run directory, in the order they are listed.
_REPORT_PATHS = (RECAP_FILE, REPORT_FILE, "report.md", SUMMARY_FILE, "metrics.jsonl",
                 "hosts", "logs", "facts", "perf", "steps", "playbook")


@dataclass
class Run:
    """One run directory as ``runs list`` shows it."""

    name: str
    path: Path
    command: str
    cluster: str | None
    started: str  # YYYY-mm-dd HH:MM:SS, local time of the control node
    duration_s: float | None
    result: str  # ok, failed, interrupted, timed out, passed, finished, or "no record"
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "command": self.command,
                "cluster": self.cluster, "started": self.started,
                "duration_s": self.duration_s, "result": self.result}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _started(stamp: str) -> str:
    return datetime.strptime(stamp, "%Y%m%d-%H%M%S").strftime("%Y-%m-%d %H:%M:%S")


def _playbook_result(record: dict[str, Any]) -> str:
    state = record.get("state") or "finished"
    if state != "finished":
        return state
    return "ok" if record.get("ok") else "failed"


def read_run(path: Path) -> Run | None:
    """The run in ``path``; None when ``path`` is not a run directory."""
    match = _NAME_RE.match(path.name)
    if not match or not path.is_dir():
        return None
    stamp, command, _ = match.groups()
    run = Run(name=path.name, path=path, command=command, cluster=None,
              started=_started(stamp), duration_s=None, result="no record")
    if (record := _read_json(path / RECAP_FILE)) is not None:
        run.record = record
        run.command = record.get("command") or command
        run.cluster = record.get("cluster")
        run.duration_s = record.get("elapsed_s")
        run.result = _playbook_result(record)
    elif (record := _read_json(path / REPORT_FILE)) is not None:
        run.record = record
        run.command = record.get("command") or command
        run.cluster = record.get("cluster")
        run.duration_s = record.get("elapsed_s")
        run.result = "passed" if record.get("passed") else "failed"
    elif (record := _read_json(path / SUMMARY_FILE)) is not None:
        run.record = record
        run.result = "finished"
    return run


def list_runs(runs_dir: Path | str | None = None, *, command: str | None = None,
              cluster: str | None = None, limit: int | None = 20) -> list[Run]:
    """The runs under the runs directory (``rundir.runs_root``), newest first."""
    root = runs_root(runs_dir)
    if not root.is_dir():
        return []
    runs = [run for path in root.iterdir() if (run := read_run(path)) is not None]
    runs = [r for r in runs if (command is None or r.command == command)
            and (cluster is None or r.cluster == cluster)]
    # Newest first: the time in the name, then the suffix a second run of that second got.
    runs.sort(key=lambda r: (r.name[:15], int(_NAME_RE.match(r.name).group(3) or 1)),
              reverse=True)
    return runs[:limit] if limit else runs


def find_run(which: str | None, runs_dir: Path | str | None = None) -> Run:
    """A run by its directory name (or the start of it), a path to its directory, or,
    with ``which`` None, the latest one."""
    if which and Path(which).is_dir() and (run := read_run(Path(which))) is not None:
        return run
    runs = list_runs(runs_dir, limit=None)
    if not runs:
        raise InputError(f"no runs in {runs_root(runs_dir)}", field="--runs-dir",
                         hint="run a command that touches nodes first, or point --runs-dir "
                              "(DSK_RUNS_DIR) at where its runs went")
    if which is None:
        return runs[0]
    exact = [r for r in runs if r.name == which]
    matches = exact or [r for r in runs if r.name.startswith(which)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise InputError(f"no run named {which!r} in {runs_root(runs_dir)}", field="RUN",
                         hint="`dsk-provision runs list` shows the runs")
    names = ", ".join(r.name for r in matches[:5]) + (" ..." if len(matches) > 5 else "")
    raise InputError(f"{which!r} names {len(matches)} runs: {names}", field="RUN",
                     hint="give more of the name")


def failures(run: Run) -> list[tuple[str, str]]:
    """What went wrong: (host, what and why), one entry per failed host or check."""
    record = run.record
    out = [(host, str(message)) for host, message in (record.get("failed") or {}).items()]
    out += [(host, f"unreachable: {message}")
            for host, message in (record.get("unreachable") or {}).items()]
    out += [(str(c.get("node")), f"{c.get('check')}: {c.get('message')}")
            for c in record.get("checks") or []
            if isinstance(c, dict) and c.get("status") == "fail"]
    if run.result in ("interrupted", "timed out"):
        out += [(host, f"stopped during {task}")
                for host, task in (record.get("running") or {}).items()]
    return out


def report_paths(run: Run) -> list[Path]:
    """The files and folders of the run worth opening, those that exist."""
    paths = [run.path / name for name in _REPORT_PATHS if (run.path / name).exists()]
    paths += sorted(run.path.glob("*.png"))
    paths += sorted((run.path / "ansible" / "artifacts").glob("*/stdout"))
    return paths


__all__ = ["Run", "failures", "find_run", "list_runs", "read_run", "report_paths"]
