"""What stops a playbook run besides its own end: an idle timeout and signals.

ansible-runner starts ansible-playbook on a pseudo-terminal in a session of its own, so
a signal sent to the CLI (Ctrl-C, SIGTERM from a service manager, SIGHUP from a closed
terminal) never reaches it: left alone, the CLI would die and ansible-playbook would go
on changing the nodes with nobody watching. While a run lasts, RunWatch

- catches SIGINT, SIGTERM and SIGHUP (the previous handlers come back afterwards) and
  asks ansible-runner to stop through its ``cancel_callback``; ansible-runner then kills
  ansible-playbook's process group;
- cancels the run when ansible-playbook has sent no event for ``idle_timeout`` seconds,
  so that a run always ends, even when something hangs that ssh's keep-alives cannot see;
- before the cancel, records every process descended from this one (ansible-playbook,
  its workers, their ssh clients) and afterwards makes sure each of them is gone, by PID
  (and start time, so that a reused PID is never hit), whatever process group it is in.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsk_provision.errors import InputError

IDLE_TIMEOUT_ENV = "DSK_IDLE_TIMEOUT"
# No event from ansible-playbook for this long means it hangs: one task on every host
# (a CUDA toolkit download, a driver build) stays well inside it.
IDLE_TIMEOUT_S = 3600.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How often ansible-runner asks whether to stop (seconds): how soon a signal takes effect.
POLL_S = 1


def idle_timeout_s(value: float | None = None) -> float:
    """The idle timeout: ``value``, else $DSK_IDLE_TIMEOUT, else IDLE_TIMEOUT_S."""
    source = "idle_timeout"
    if value is None:
        text = os.environ.get(IDLE_TIMEOUT_ENV)
        if not text:
            return IDLE_TIMEOUT_S
        source = IDLE_TIMEOUT_ENV
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{text!r} is not a number of seconds", field=source) from None
    if not value > 0:
        raise InputError(f"{value!r}: the idle timeout must be a positive number of seconds",
                         field=source)
    return float(value)


@dataclass(frozen=True)
class Proc:
    pid: int
    pgid: int
    start: int  # clock ticks after boot (/proc/<pid>/stat field 22): tells a reused PID
    name: str


def _stat(pid: int) -> tuple[int, int, int, str, str] | None:
    """(ppid, pgid, start time, state, name) of a live process, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.find("(") + 1:text.rfind(")")]
    fields = text[text.rfind(")") + 2:].split()
    # fields[0] is field 3 (state) of proc(5); ppid 4, pgrp 5, starttime 22
    return int(fields[1]), int(fields[2]), int(fields[19]), fields[0], name


def alive(proc: Proc) -> bool:
    """The process still runs (not a zombie) and is the one recorded (same start time)."""
    st = _stat(proc.pid)
    return st is not None and st[2] == proc.start and st[3] not in ("Z", "X")


def _table() -> dict[int, tuple[int, int, int, str, str]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[3] not in ("Z", "X"):
                table[int(entry)] = st
    return table


def descendants(root: int) -> list[Proc]:
    """Every live process below ``root`` (children, their children ...)."""
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st[0], []).append(pid)
    out: list[Proc] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        _ppid, pgid, start, _state, name = table[pid]
        out.append(Proc(pid, pgid, start, name))
        todo += children.get(pid, [])
    return out


def group_members(groups: set[int]) -> list[Proc]:
    """Live processes of this user in any of the process groups ``groups``."""
    return [Proc(pid, st[1], st[2], st[4]) for pid, st in _table().items()
            if st[1] in groups and _same_user(pid)]


def stop_processes(procs: list[Proc], grace_s: float = 3.0) -> list[Proc]:
    """SIGTERM each recorded process still alive, SIGKILL those left after ``grace_s``;
    returns the ones that were still alive. Only the recorded PIDs are signalled."""
    left = [p for p in procs if alive(p)]
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for p in left:
            if alive(p):
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while any(alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(alive(p) for p in left):
            break
    return left


class RunWatch:
    """The ``cancel_callback`` of one ansible-runner run; a context manager that holds
    the signal handlers for the run's duration."""

    def __init__(self, idle_timeout: float, *, clock: Callable[[], float] = time.monotonic):
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.last_event = clock()
        self.signum: int | None = None
        self.idle_expired = False
        self.recorded: list[Proc] = []
        self.stopped: list[Proc] = []  # recorded processes that outlived ansible-runner's kill
        self._previous: dict[int, object] = {}

    # ---- signals
    def __enter__(self) -> RunWatch:
        self.last_event = self.clock()
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    # ---- events and the cancel decision
    def note_event(self) -> None:
        self.last_event = self.clock()

    @property
    def cancelled(self) -> bool:
        return self.signum is not None or self.idle_expired

    def cancel_requested(self) -> bool:
        """ansible-runner's cancel_callback: True stops the run. Records the processes
        to check afterwards just before saying so (ansible-runner kills right after)."""
        if (self.signum is None and not self.idle_expired
                and self.clock() - self.last_event > self.idle_timeout):
            self.idle_expired = True
        if self.cancelled and not self.recorded:
            self.recorded = descendants(os.getpid())
        return self.cancelled

    def reap(self) -> list[Proc]:
        """After a cancelled run: make sure every recorded process is gone, including
        those of process groups the group kill did not reach. Returns the stragglers
        that had to be stopped here."""
        own_group = os.getpgid(0)
        groups = {p.pgid for p in self.recorded if p.pgid != own_group}
        extra = [p for p in group_members(groups) if p not in self.recorded]
        self.stopped = stop_processes(self.recorded + extra)
        return self.stopped


def _same_user(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


__all__ = ["IDLE_TIMEOUT_ENV", "IDLE_TIMEOUT_S", "STOP_SIGNALS", "Proc", "RunWatch", "alive",
           "descendants", "group_members", "idle_timeout_s", "stop_processes"]
