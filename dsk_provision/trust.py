"""The cluster key on the control node: where it lives, and what every playbook is told.

The ssh_trust role keeps the cluster's SSH key pair in ``ssh_trust_key_dir``. Unless the
inventory sets that variable, it is the cluster's state directory (dsk_provision.state):
outside any repository, 0700, one per ``dsk_cluster_name`` and owned by one inventory.
The runner passes that directory to every playbook as ``dsk_cluster_state_dir``
(``playbook_vars``); a plain ``ansible-playbook`` run gets the same path from the
``dsk_cluster_state_dir`` lookup (lookup_plugins/), which calls this module too.

Clusters made before keys moved there kept theirs in ``<inventory dir>/.ssh_trust``:
the first run that finds a key there moves it into the state directory and says so.

The key's files in that directory (``KeyFiles``: the current key, and during a rotation
the next or the old one) are named here too, and what they say of an unfinished rotation
(``pending_step``): ``check`` warns of one, and ``keys rotate`` (dsk_provision.keys)
resumes it.
"""

from __future__ import annotations

import filecmp
import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from dsk_provision import state
from dsk_provision.errors import InputError

if TYPE_CHECKING:
    from dsk_provision.inventory import Inventory

KEY_DIR_VAR = "ssh_trust_key_dir"
# Where the cluster key was kept before it moved to the state directory.
LEGACY_KEY_DIR = ".ssh_trust"
# A rotation's key files beside the current one (dsk_provision.keys): the next and the old.
NEXT_SUFFIX = ".next"
OLD_SUFFIX = ".old"


# The ssh_trust role names the key file (ssh_trust_private_key in its vars/main.yml).
ROLE_VARS = Path(__file__).resolve().parent.parent / "roles" / "ssh_trust" / "vars" / "main.yml"


@functools.cache
def cluster_key_name() -> str:
    """The cluster private key's file name in its directory, as the ssh_trust role
    writes it (``id_ed25519``)."""
    import yaml

    with ROLE_VARS.open(encoding="utf-8") as fh:
        return PurePosixPath(yaml.safe_load(fh)["ssh_trust_private_key"]).name


def explicit_key_dir(inventory: Inventory) -> Path | None:
    """``ssh_trust_key_dir`` as the inventory sets it (None when it does not)."""
    value = inventory.first_node.vars.get(KEY_DIR_VAR) if inventory.nodes else None
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        raise InputError(f"{value!r} is a relative path: Ansible would read it relative to "
                         "where it runs", file=str(inventory.hosts_file), field=KEY_DIR_VAR,
                         hint="write an absolute path, or remove it to keep the key in the "
                              "cluster's state directory")
    return path


def key_dir(inventory: Inventory) -> Path:
    """The control-node directory of the cluster key pair: the inventory's
    ``ssh_trust_key_dir``, else the cluster's state directory."""
    return explicit_key_dir(inventory) or state.cluster_state_dir(inventory.cluster_name)


def legacy_key_dir(inventory: Inventory) -> Path:
    return inventory.hosts_file.parent / LEGACY_KEY_DIR


def git_work_tree(path: Path) -> Path | None:
    """The git work tree that holds ``path`` (existing or not), or None."""
    probe = Path(os.path.abspath(path))
    for directory in (probe, *probe.parents):
        if (directory / ".git").exists():
            return directory
    return None


def key_dir_warnings(inventory: Inventory) -> list[str]:
    """What ``check`` warns about the key directory: inside a git work tree, or an old
    key beside the inventory."""
    warnings = []
    directory = key_dir(inventory)
    tree = git_work_tree(directory)
    if tree is not None:
        how = (f"{KEY_DIR_VAR} is set to it" if explicit_key_dir(inventory)
               else f"the state directory root is under it ({state.STATE_DIR_ENV} or HOME)")
        warnings.append(f"the cluster key directory {directory} is inside the git work tree "
                        f"{tree} ({how}): one `git add` would publish root access to every "
                        f"node; keep the key outside any repository")
    step = pending_step(KeyFiles(directory, cluster_key_name()))
    if step is not None:
        warnings.append(f"a cluster key rotation stopped at its {step} step: run "
                        "`dsk-provision keys rotate` to finish it")
    legacy = legacy_key_dir(inventory)
    if explicit_key_dir(inventory) is None and _key_files(legacy):
        warnings.append(f"a cluster key is still in {legacy}, beside the inventory: the next "
                        f"bootstrap moves it to {directory}")
    return warnings


def _key_files(directory: Path) -> list[Path]:
    if not directory.is_dir() or directory.is_symlink():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink())


def adopt_legacy_key(inventory: Inventory, target: Path, *, check: bool,
                     say: Callable[[str], None]) -> Path | None:
    """Move a key left in ``<inventory dir>/.ssh_trust`` into ``target`` (the state
    directory). In check mode nothing moves: the old directory is returned, for the run
    to compare the nodes with the key they really have. Two different keys are refused."""
    legacy = legacy_key_dir(inventory)
    files = _key_files(legacy)
    if not files:
        return None
    clashes = [f for f in files if (target / f.name).exists()]
    different = [f for f in clashes if not filecmp.cmp(f, target / f.name, shallow=False)]
    if different:
        raise InputError(
            f"two different cluster keys: {legacy} (beside the inventory, where keys were "
            f"kept before) and {target} (the cluster's state directory)",
            file=str(inventory.hosts_file), field=KEY_DIR_VAR,
            hint=f"keep the one the nodes trust and delete the other, or set {KEY_DIR_VAR} "
                 "to the directory to use")
    if check:
        say(f"check mode: the cluster key in {legacy} would move to {target}")
        return legacy
    for f in files:
        if f in clashes:
            f.unlink()  # the same file is already in the state directory
        else:
            shutil.move(str(f), str(target / f.name))
    try:
        legacy.rmdir()
    except OSError:
        pass  # something else is in there: leave it
    say(f"moved the cluster key from {legacy} to {target} (outside the repository); "
        "back it up from there")
    return None


def playbook_vars(inventory: Inventory, *, check: bool,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """The control-node variables every playbook gets: ``dsk_cluster_state_dir``, the cluster's
    state directory, claimed for this inventory (made and recorded unless ``check``), and
    in check mode the old key directory while the key has not moved yet."""
    directory = state.claim_cluster_state_dir(inventory.cluster_name, inventory.hosts_file,
                                              create=not check)
    out: dict[str, Any] = {"dsk_cluster_state_dir": str(directory)}
    if explicit_key_dir(inventory) is None:
        legacy = adopt_legacy_key(inventory, directory, check=check, say=say)
        if legacy is not None:
            out[KEY_DIR_VAR] = str(legacy)
    return out


@dataclass(frozen=True)
class KeyFiles:
    """The cluster key's files in its directory, current, next and retired."""

    directory: Path
    name: str

    @property
    def current(self) -> Path:
        return self.directory / self.name

    @property
    def next(self) -> Path:
        return self.directory / (self.name + NEXT_SUFFIX)

    @property
    def old(self) -> Path:
        return self.directory / (self.name + OLD_SUFFIX)

    @staticmethod
    def public(private: Path) -> Path:
        return private.with_name(private.name + ".pub")


def key_files(inventory: Inventory) -> KeyFiles:
    return KeyFiles(key_dir(inventory), cluster_key_name())


def pending_step(keys: KeyFiles) -> str | None:
    """Where an unfinished rotation stopped: ``"authorize"`` (the next key exists, the
    current one is still in force), ``"retire"`` (the new key is in force, the old one
    may still be accepted somewhere), or None (no rotation under way)."""
    if keys.next.exists():
        return "authorize"
    if keys.old.exists() or keys.public(keys.old).exists():
        return "retire"
    return None
