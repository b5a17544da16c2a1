"""Host-side helpers: commands, required tools, whole-file writes, detached processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from dsk_provision.errors import EnvironmentProblem

# host tool -> the Debian package that provides it
TOOLS = {
    "systemd-nspawn": "systemd-container",
    "mmdebstrap": "mmdebstrap",
    "ip": "iproute2",
    "tc": "iproute2",
    "dpkg-scanpackages": "dpkg-dev",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "apt-get": "apt",
    "mount": "mount",
    "umount": "mount",
    "setsid": "util-linux",
}
_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":" + _SBIN)


def require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem("the sandbox needs root (network namespaces, mounts, "
                                 "systemd-nspawn)", hint="run it with sudo or as root")


def require_tools(tools: Sequence[str] = tuple(TOOLS)) -> None:
    missing = [t for t in tools if which(t) is None]
    if missing:
        pkgs = sorted({TOOLS.get(t, t) for t in missing})
        raise EnvironmentProblem(f"missing host tools: {', '.join(missing)}",
                                 hint=f"apt-get install {' '.join(pkgs)}")


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float | None = 600, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; a failure raises EnvironmentProblem with stderr."""
    exe = which(cmd[0]) or cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, input=input,
                          timeout=timeout, cwd=cwd,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise EnvironmentProblem(f"command failed ({proc.returncode}): {' '.join(cmd)}"
                                 + ("\n  " + "\n  ".join(detail) if detail else ""))
    return proc


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    if state in ("Z", "X"):
        return None
    return raw.decode(errors="replace").split("\0")


def pid_matches(pid: int | None, *markers: str) -> bool:
    """True when pid is a live process whose command line contains every marker.

    Checking the command line keeps a recycled PID from being mistaken for ours.
    """
    if not pid:
        return False
    cmd = proc_cmdline(pid)
    return cmd is not None and all(any(m in arg for arg in cmd) for m in markers)


def find_pids(pattern: re.Pattern[str]) -> list[int]:
    """Live processes with a command-line argument that fully matches pattern."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            cmd = proc_cmdline(int(entry.name))
            if cmd and any(pattern.fullmatch(arg) for arg in cmd):
                found.append(int(entry.name))
    return found


def stop_pids(pids: Sequence[int], *markers: str, timeout: float = 15.0) -> None:
    """SIGTERM the given processes (only if they still match markers), SIGKILL stragglers."""
    pids = [p for p in pids if pid_matches(p, *markers)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_matches(p, *markers)]
        time.sleep(0.1)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_matches(p, *markers)]
        time.sleep(0.05)


def spawn_detached(cmd: Sequence[str], log: Path, pidfile: Path) -> int:
    """Start cmd in its own session, not as our child (setsid -f), and return its PID.

    The shell writes its PID and then execs cmd, so the PID is cmd's own.
    """
    pidfile.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    exe = which(cmd[0]) or cmd[0]
    with open(log, "ab") as out:
        subprocess.run([which("setsid") or "setsid", "-f", "/bin/sh", "-c",
                        'echo $$ > "$0"; exec "$@"', str(pidfile), exe, *cmd[1:]],
                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            text = pidfile.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n") or text.isdigit():
            pidfile.unlink(missing_ok=True)
            return int(text)
        time.sleep(0.02)
    raise EnvironmentProblem(f"could not start {cmd[0]} (no PID after 10 s); see {log}")


def find_container_pids(upper_prefix: str) -> list[int]:
    """Processes whose root is an overlay with an upper dir under upper_prefix.

    A container's init outlives a killed systemd-nspawn (it is reparented, not killed);
    it is recognised by the root mount of its own mount namespace.
    """
    own_mnt = os.stat("/proc/self/ns/mnt").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns/mnt").st_ino == own_mnt:
                continue
            for line in (entry / "mountinfo").read_text().splitlines():
                fields = line.split()
                if fields[4] == "/" and f"upperdir={upper_prefix}" in line:
                    found.append(int(entry.name))
                    break
        except (OSError, IndexError):
            continue
    return found


def kill_containers(upper_prefix: str, timeout: float = 10.0) -> int:
    """SIGKILL every process left in containers rooted under upper_prefix; how many."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in find_container_pids(upper_prefix) if proc_cmdline(p) is not None]
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
                killed.add(p)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return len(killed)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on path: concurrent builds of one cached item take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
