"""Files in a node's root, written from the host without following the node's links.

A node's root is an overlay whose upper layer the node's own root user writes, and a
kept node disk survives `sandbox up`: any path in it may have become a symbolic link,
and an absolute link resolves, on the host, against the host's own ``/``. So everything
the host writes, reads or changes the mode of under a node root goes through here:
directories are opened one at a time from the root down with ``O_NOFOLLOW`` (a link
where a directory should be is refused, naming it), files are written beside their
target and renamed over it (a rename replaces a link, it never writes through one), and
modes are set on open descriptors, never by path. Nothing here can reach outside the
node's tree.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path, PurePosixPath

from dsk_provision.errors import EnvironmentProblem

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(relative: str | PurePosixPath) -> tuple[str, ...]:
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or any(p in (".", "..") for p in parts):
        raise ValueError(f"{relative!r} is not a plain path inside a node")
    return parts


def _refuse(root: Path, parts: tuple[str, ...]) -> EnvironmentProblem:
    where = Path(root, *parts)
    return EnvironmentProblem(
        f"{where} is a symbolic link or not a directory: the node changed its own "
        "system files, and the sandbox does not follow links out of a node",
        hint="remove the node's disk: `dsk-provision sandbox down --name <name>`, then up")


def open_dir(root: Path, relative: str | PurePosixPath = "", *,
             create_mode: int | None = None) -> int:
    """A descriptor of ``root/relative``, every step opened without following links;
    missing directories are made with ``create_mode`` (None: FileNotFoundError)."""
    parts = _parts(relative) if str(relative) else ()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, part in enumerate(parts, 1):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create_mode is None:
                    raise
                os.mkdir(part, create_mode, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(child, create_mode)  # mkdir's mode passes through the umask
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(root, parts[:depth]) from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def make_dir(root: Path, relative: str | PurePosixPath, mode: int) -> None:
    """``mkdir -p`` inside the node; the last directory gets exactly ``mode``."""
    fd = open_dir(root, relative, create_mode=mode)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_file(root: Path, relative: str | PurePosixPath, content: str | bytes,
               mode: int = 0o644, *, dir_mode: int = 0o755) -> None:
    """Write ``root/relative`` whole (temp file, fsync, rename over the target, fsync the
    directory); a link at the target is replaced, not followed."""
    parts = _parts(relative)
    data = content.encode() if isinstance(content, str) else content
    dfd = open_dir(root, PurePosixPath(*parts[:-1]) if len(parts) > 1 else "",
                   create_mode=dir_mode)
    try:
        tmp = f".{parts[-1]}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            try:
                os.fchmod(fd, mode)
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_regular(root: Path, relative: str | PurePosixPath, flags: int) -> int | None:
    """A descriptor of a regular file at ``root/relative``, or None when there is none
    (missing, a link, a directory, a device, a FIFO ...)."""
    parts = _parts(relative)
    try:
        dfd = open_dir(root, PurePosixPath(*parts[:-1]) if len(parts) > 1 else "")
    except FileNotFoundError:
        return None
    try:
        fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO):
            return None
        raise
    finally:
        os.close(dfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_file(root: Path, relative: str | PurePosixPath) -> bytes | None:
    """The content of a regular file in the node; None for anything else or nothing."""
    fd = _open_regular(root, relative, os.O_RDONLY)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def chmod_file(root: Path, relative: str | PurePosixPath, mode: int) -> bool:
    """Set a regular file's mode through its descriptor; False when there is no regular
    file there (a link is never followed)."""
    fd = _open_regular(root, relative, os.O_RDONLY)
    if fd is None:
        return False
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


__all__ = ["chmod_file", "make_dir", "open_dir", "read_file", "write_file"]
