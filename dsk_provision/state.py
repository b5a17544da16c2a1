"""Per-cluster state on the control node, kept outside any repository.

What the tool must remember about a cluster between runs and must not publish with the
inventory (the cluster's SSH key pair, the lock that keeps two runs apart) lives in one
directory per cluster:

    $DSK_STATE_DIR/<cluster name>/            when DSK_STATE_DIR is set
    $XDG_STATE_HOME/dsk-provision/<cluster>/  else, when XDG_STATE_HOME is set
    ~/.local/state/dsk-provision/<cluster>/   otherwise

Directories are private (0700) whatever the umask.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsk_provision.errors import InputError
from dsk_provision.files import make_private_dir

STATE_DIR_ENV = "DSK_STATE_DIR"


def state_root() -> Path:
    """The directory that holds one state directory per cluster."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "dsk-provision"
    return Path.home() / ".local" / "state" / "dsk-provision"


def cluster_state_dir(cluster: str, *, create: bool = False) -> Path:
    """The state directory of the cluster named ``cluster`` (0700 when ``create``)."""
    if not cluster or "/" in cluster or cluster in (".", ".."):
        raise InputError(f"cluster name {cluster!r} cannot name a state directory",
                         field="dsk_cluster_name",
                         hint="use letters, digits, '-', '_' or '.'")
    path = state_root() / cluster
    if create:
        make_private_dir(path)
    return path
