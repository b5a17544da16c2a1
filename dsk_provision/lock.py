"""One run at a time per cluster: an exclusive lock in the cluster's state directory.

Every command that changes or runs things on the nodes (any playbook run: bootstrap,
validate; the launcher: train and validate's benchmarks) holds the lock of its cluster
(``dsk_cluster_name``) while it runs; ``check`` and the other read-only commands do not
take it. A second run against the same cluster fails at once with ClusterBusy, naming
the holder (pid, user, host, command, start time), instead of colliding with the first
(the rendezvous port, key generation, half-applied roles).

The lock is ``fcntl.flock`` on ``<state dir>/<cluster>/lock``: the kernel releases it
when the holder exits, however it exits (a crash, SIGKILL), so a lock is never stale.
The holder's details are written into the file after the lock is taken; they are only
information, never what decides. Within one process the lock is reentrant: validate
holds it for the whole flow and its playbook run takes it again.
"""

from __future__ import annotations

import fcntl
import functools
import getpass
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dsk_provision.errors import ClusterBusy
from dsk_provision.state import cluster_state_dir

LOCK_FILE = "lock"
_held: dict[Path, list[int]] = {}  # lock path -> [fd, depth], this process's locks
_held_guard = threading.Lock()  # validate's probes take the lock again from threads
_F = TypeVar("_F", bound=Callable[..., Any])


def lock_path(cluster: str) -> Path:
    """The lock file of the cluster named ``cluster`` (its state directory is created)."""
    return cluster_state_dir(cluster, create=True) / LOCK_FILE


def read_holder(path: Path) -> dict[str, Any]:
    """The holder's details as written in the lock file ({} when none can be read)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')}, "
            f"{holder.get('user', '?')}@{holder.get('host', '?')}, "
            f"started {holder.get('started', '?')})")


@contextmanager
def cluster_lock(cluster: str, command: str) -> Iterator[Path]:
    """Hold the cluster's lock for the ``with`` block; raise ClusterBusy naming the
    holder when another process holds it. Reentrant within a process."""
    path = lock_path(cluster)
    with _held_guard:
        mine = _held.get(path)
        if mine is not None:
            mine[1] += 1
    if mine is not None:
        try:
            yield path
        finally:
            with _held_guard:
                mine[1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = {}
        for _ in range(10):  # the holder writes its details right after taking the lock
            holder = read_holder(path)
            if holder:
                break
            time.sleep(0.05)
        raise ClusterBusy(
            f"cluster {cluster} is busy: {describe_holder(holder)} holds its lock ({path})",
            hint="wait for that run to finish, or stop it; the lock goes away with its "
                 "process") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        holder = {"pid": os.getpid(), "user": _user(), "host": socket.gethostname(),
                  "command": command, "argv": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        with _held_guard:
            _held[path] = [fd, 1]
        yield path
    finally:
        with _held_guard:
            _held.pop(path, None)
        try:
            os.ftruncate(fd, 0)  # no details of a finished run linger
        finally:
            os.close(fd)  # releases the lock


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def holds_cluster_lock(command: str) -> Callable[[_F], _F]:
    """Decorator: the function (whose first argument is the Inventory) runs holding its
    cluster's lock, recorded as ``command``."""

    def wrap(func: _F) -> _F:
        @functools.wraps(func)
        def locked(inventory, *args: Any, **kwargs: Any) -> Any:
            with cluster_lock(inventory.cluster_name, command):
                return func(inventory, *args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap


__all__ = ["LOCK_FILE", "cluster_lock", "describe_holder", "holds_cluster_lock",
           "lock_path", "read_holder"]
