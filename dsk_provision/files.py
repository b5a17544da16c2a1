"""Files written whole: a reader sees the old content or the new, never half of either.

Run directories and everything in them (logs, node facts, reports) hold what a cluster
looks like from inside, so they are private to the user who ran the command: directories
0700, files 0600, whatever the umask says (``make_private_dir``, ``write_private``,
``open_private``).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_dirs(path: Path, mode: int | None = None) -> Path:
    """``mkdir -p``; the directories it creates get exactly ``mode`` (None: the umask's)."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o777 if mode is None else mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made by another process meanwhile: its mode is its maker's
        if mode is not None:
            os.chmod(directory, mode)  # mkdir's mode passes through the umask
    return path


def make_private_dir(path: Path) -> Path:
    """``mkdir -p`` whose new directories are 0700, and ``path`` itself 0700."""
    path = make_dirs(path, PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, content: str | bytes, mode: int = 0o644, *,
               dir_mode: int | None = None) -> Path:
    """Write a temp file in the target's directory, flush it to disk, rename it over the
    target and flush the directory, so that after a crash the target holds the old
    content or the new one, never nothing. Missing parents get ``dir_mode``."""
    path = Path(path)
    make_dirs(path.parent, dir_mode)
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_private(path: Path, content: str | bytes) -> Path:
    """``write_file`` for a run directory: the file 0600, missing parents 0700."""
    return write_file(path, content, PRIVATE_FILE_MODE, dir_mode=PRIVATE_DIR_MODE)


def open_private(path: Path, mode: str = "a", **kwargs):
    """``open(path, mode)`` for writing a file that is 0600 whatever the umask; missing
    parents are made 0700. ``mode`` is "w", "a", "wb" or "ab"."""
    if mode.rstrip("b") not in ("w", "a"):
        raise ValueError(f"open_private writes; mode {mode!r} is not 'w' or 'a'")
    path = Path(path)
    make_dirs(path.parent, PRIVATE_DIR_MODE)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def make_private_tree(root: Path) -> None:
    """Close down what others wrote under ``root`` with their own modes (ansible-runner's
    artifacts): directories 0700, files keep only the owner's bits. Links are not
    followed."""
    root = Path(root)
    if not root.is_dir():
        return
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            entry = Path(current) / name
            st = entry.lstat()
            if stat.S_ISDIR(st.st_mode):
                wanted = PRIVATE_DIR_MODE
            elif stat.S_ISREG(st.st_mode):
                wanted = stat.S_IMODE(st.st_mode) & 0o700  # the owner's bits only
            else:
                continue
            if stat.S_IMODE(st.st_mode) != wanted:
                os.chmod(entry, wanted)
    os.chmod(root, PRIVATE_DIR_MODE)
