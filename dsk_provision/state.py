"""Per-cluster state on the control node, kept outside any repository.

What the tool must remember about a cluster between runs and must not publish with the
inventory (the cluster's SSH key pair, the lock that keeps two runs apart) lives in one
directory per cluster:

    $DSK_STATE_DIR/<cluster name>/            when DSK_STATE_DIR is set
    $XDG_STATE_HOME/dsk-provision/<cluster>/  else, when XDG_STATE_HOME is set
    ~/.local/state/dsk-provision/<cluster>/   otherwise

Directories are private (0700) whatever the umask.

A state directory belongs to one inventory: the first run records the inventory's hosts
file in ``<state dir>/inventory`` and a run from any other inventory that uses the same
``dsk_cluster_name`` is refused, so that two clusters never share one key by accident.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dsk_provision.errors import InputError
from dsk_provision.files import make_private_dir, write_private

STATE_DIR_ENV = "DSK_STATE_DIR"
# Inside a state directory: the hosts file of the inventory it belongs to.
OWNER_FILE = "inventory"


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


def _owner_of(path: Path) -> str | None:
    try:
        return (path / OWNER_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def claim_cluster_state_dir(cluster: str, hosts_file: Path, *, create: bool = True) -> Path:
    """The state directory of ``cluster``, claimed for the inventory whose hosts file is
    ``hosts_file``: recorded there on first use (when ``create``), and refused when it
    already belongs to another inventory. With ``create`` false nothing is written (check
    mode, ``dsk-provision check``), but a conflict is still refused."""
    path = cluster_state_dir(cluster)
    mine = str(Path(hosts_file).resolve())
    owner = _owner_of(path)
    if owner is not None and owner != mine:
        raise InputError(
            f"cluster name {cluster!r} is already used by the inventory {owner}: its state "
            f"directory {path} (the cluster key, the pinned host keys) belongs to that "
            f"inventory, not to {mine}",
            file=mine, field="dsk_cluster_name",
            hint="give this cluster its own dsk_cluster_name; if the inventory was moved "
                 f"here, write its new path into {path / OWNER_FILE}")
    if create:
        make_private_dir(path)
        if owner is None:
            write_private(path / OWNER_FILE, mine + "\n")
    return path


def forget_cluster_state_dir(cluster: str, hosts_file: Path) -> bool:
    """Delete the state directory of ``cluster`` (its key, its pinned host keys) when it
    belongs to the inventory ``hosts_file``: for clusters that are gone for good, such as
    a sandbox taken down. Returns whether it was deleted."""
    path = cluster_state_dir(cluster)
    if _owner_of(path) != str(Path(hosts_file).resolve()):
        return False
    shutil.rmtree(path)
    return True
