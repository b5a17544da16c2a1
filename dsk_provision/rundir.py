"""Run directories: .dsk/runs/<YYYYmmdd-HHMMSS>-<command>/ for every command that touches nodes."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from dsk_provision.errors import InputError
from dsk_provision.files import PRIVATE_DIR_MODE, make_dirs

RUNS_DIR_ENV = "DSK_RUNS_DIR"
# A playbook run's record in its run directory (dsk_provision.runner writes it at the end).
RECAP_FILE = "recap.json"
_COMMAND_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def runs_root(runs_dir: Path | str | None = None) -> Path:
    """Where run directories go: the argument, else $DSK_RUNS_DIR, else ./.dsk/runs."""
    if runs_dir is not None:
        return Path(runs_dir)
    env = os.environ.get(RUNS_DIR_ENV)
    if env:
        return Path(env)
    return Path.cwd() / ".dsk" / "runs"


def new_run_dir(command: str, runs_dir: Path | str | None = None) -> Path:
    """Create and return a fresh run directory named after the time and the command.

    Two runs that start in the same second get distinct directories: the second one
    gets a numeric suffix (``-2``, ``-3`` ...). ``mkdir`` without ``exist_ok`` is the
    arbiter, so concurrent processes never share a directory. The run directory, and
    the parents made for it, are private (0700) whatever the umask: what lands in it
    (logs, node facts, reports) describes the cluster from inside.
    """
    if not _COMMAND_RE.match(command):
        raise InputError(f"invalid command name {command!r} for a run directory",
                         field="command", hint="use lowercase letters, digits, '-' or '_'")
    root = runs_root(runs_dir)
    make_dirs(root, PRIVATE_DIR_MODE)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{command}"
    for attempt in range(1, 1000):
        candidate = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(candidate, PRIVATE_DIR_MODE)  # mkdir's mode passes through the umask
        return candidate
    raise InputError(f"too many run directories named {base} in {root}",
                     field="runs_dir", hint="clean up old runs or choose another --runs-dir")
