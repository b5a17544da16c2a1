"""What a playbook run shows on the console, built from ansible-runner's job events.

The console stays the same size whatever the node count; the detail is in the run
directory (``hosts/<host>.log``, the job events). What it prints, one line each:

- ``PLAY <name>`` when a play starts, and when it ends the play's task count, result
  counts and time;
- at the end of each task that changed something, failed, or was unreachable on some
  host: the task and its counts (ok / changed / skipped / failed / unreachable), with
  the host names when only a few hosts changed or failed (FEW_HOSTS), counts otherwise.
  A task that was ok or skipped everywhere prints nothing of its own: it is counted in
  its play's line;
- a failure or an unreachable host the moment its result arrives, with its message;
- the reasons roles give for what they skip (their ``debug`` notes), once per task and
  message, naming the hosts;
- with ``per_host`` (``-v``): every host's result too, one line each, as Ansible does.

On a terminal a status area under those lines is redrawn in place: the play and the
task, hosts done / total, the task's counts so far, the hosts still running when only a
few are left, and the time elapsed. Elsewhere (a pipe, CI) only the lines above print,
each once, with no redrawing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

# Up to this many hosts are named in a task's line; more are counted.
FEW_HOSTS = 4
# The order a task's counts are shown in.
STATUSES = ("ok", "changed", "skipped", "failed", "unreachable", "ignored")
NOTE_ACTIONS = ("debug", "ansible.builtin.debug")
_MAX_MESSAGE = 400
_TASK_STARTS = ("playbook_on_task_start", "playbook_on_handler_task_start")
_RESULTS = {"runner_on_ok": "ok", "runner_on_failed": "failed",
            "runner_on_skipped": "skipped", "runner_on_unreachable": "unreachable"}


def shorten(text: str, limit: int = _MAX_MESSAGE) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_HIDDEN = "output hidden (no_log: true)"


def failure_message(res: Any) -> str:
    """A one-line reason from a task result, never revealing a no_log task's data."""
    if not isinstance(res, dict):
        return "failed"
    if res.get("_ansible_no_log") or "censored" in res:
        return _HIDDEN
    results = res.get("results")
    if isinstance(results, list):
        for item in results:
            if isinstance(item, dict) and item.get("failed"):
                return failure_message(item)
    parts = []
    msg = res.get("msg") or res.get("reason")
    if msg:
        parts.append(str(msg))
    stderr = (res.get("stderr") or "").strip()
    if stderr:
        parts.append(stderr.splitlines()[-1])
    elif res.get("rc") not in (None, 0) and not parts:
        parts.append(f"exit code {res['rc']}")
    return shorten(": ".join(parts)) if parts else "failed"


def result_status(event: dict) -> str | None:
    """ok, changed, skipped, failed, ignored or unreachable for a host's final result of
    a task; None for every other event (loop items, starts, plays ...)."""
    kind = event.get("event", "")
    status = _RESULTS.get(kind)
    if status is None:
        return None
    data = event.get("event_data") or {}
    if not data.get("host"):
        return None
    res = data.get("res")
    if status == "ok" and isinstance(res, dict) and res.get("changed"):
        return "changed"
    if status == "failed" and data.get("ignore_errors"):
        return "ignored"
    return status


def task_title(data: dict) -> str:
    """``role : task`` as Ansible shows it, or the task alone outside a role."""
    task = data.get("task") or data.get("name") or ""
    role = data.get("role")
    return f"{role} : {task}" if role else task


def name_hosts(hosts: list[str], total: int) -> str:
    """``node1, node3`` for a few hosts, ``all 3`` when every host, else nothing."""
    if len(hosts) > 1 and len(hosts) == total and total > FEW_HOSTS:
        return "all"
    if len(hosts) <= FEW_HOSTS:
        return ", ".join(hosts)
    return ""


@dataclass
class TaskTally:
    """One task's results so far."""

    title: str
    started: float
    hosts: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in STATUSES})
    running: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)  # message -> hosts

    @property
    def done(self) -> int:
        return sum(len(v) for v in self.hosts.values())

    def count(self, status: str) -> int:
        return len(self.hosts[status])

    @property
    def notable(self) -> bool:
        return any(self.hosts[s] for s in ("changed", "failed", "unreachable", "ignored"))

    def counts_text(self, total: int, order: dict[str, int]) -> str:
        """``ok 5, changed 3 (node1, node4, node7)``: hosts in ``order`` (the inventory's)."""
        parts = []
        for status in STATUSES:
            hosts = self.hosts[status]
            if not hosts:
                continue
            text = f"{status} {len(hosts)}"
            if status not in ("ok", "skipped"):
                names = name_hosts(sorted(hosts, key=lambda h: (order.get(h, len(order)), h)),
                                   total)
                if names:
                    text += f" ({names})"
            parts.append(text)
        return ", ".join(parts) or "no hosts"


@dataclass
class PlayTally:
    name: str
    started: float
    tasks: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    hosts: set[str] = field(default_factory=set)  # hosts that answered its ended tasks


class RunConsole:
    """Feeds on ansible-runner events (``handle``); prints the lines described above and,
    on a terminal (``live``), redraws the status area. A context manager: the status
    area lives between ``__enter__`` and ``__exit__``."""

    def __init__(self, console: Console, hosts: list[str], *, live: bool,
                 per_host: bool = False, clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.run_hosts = list(hosts)
        self.order = {h: i for i, h in enumerate(self.run_hosts)}
        self.per_host = per_host
        self.clock = clock
        self.started = clock()
        self.play: PlayTally | None = None
        self.task: TaskTally | None = None
        self.task_number = 0
        # Hosts that failed or were unreachable: out of the run. This set and a play's
        # hosts are replaced, never changed in place: the status area reads them from
        # rich's refresh thread.
        self.gone: set[str] = set()
        self._live = None
        if live:
            from rich.live import Live

            self._live = Live(get_renderable=self.status, console=console,
                              refresh_per_second=4, transient=True,
                              redirect_stdout=False, redirect_stderr=False)

    # ---- lifecycle
    def __enter__(self) -> RunConsole:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def finish(self) -> None:
        """Close the task and the play in progress (their lines print)."""
        self._end_task()
        self._end_play()

    def say(self, text: str) -> None:
        """One line above the status area (or alone, without one)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # ---- events
    def handle(self, event: dict) -> None:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            self._end_task()
            self._end_play()
            self.play = PlayTally(name=data.get("play") or data.get("name") or "",
                                  started=self.clock())
            self.say(f"PLAY {self.play.name}")
        elif kind in _TASK_STARTS:
            self._end_task()
            self.task_number += 1
            self.task = TaskTally(title=task_title(data), started=self.clock())
            if self.play is not None:
                self.play.tasks += 1
            if self.per_host:
                self.say(f"  TASK {self.task.title}")
        elif kind == "runner_on_start":
            host = data.get("host")
            if host and self.task is not None and host not in self.task.running:
                self.task.running.append(host)
        elif kind == "playbook_on_no_hosts_remaining":
            self.say("  no hosts left to run on")
        elif kind == "playbook_on_stats":
            self.finish()
        else:
            status = result_status(event)
            if status is not None:
                self._result(status, data)

    def _result(self, status: str, data: dict) -> None:
        host = data["host"]
        task = self.task
        if task is None:  # a result outside any task: keep the count straight
            task = self.task = TaskTally(title=task_title(data), started=self.clock())
        if host in task.running:
            task.running.remove(host)
        if host not in task.hosts[status]:
            task.hosts[status].append(host)
        res = data.get("res")
        message = ""
        if status in ("failed", "unreachable", "ignored"):
            message = failure_message(res)
        elif (data.get("task_action") in NOTE_ACTIONS and isinstance(res, dict)
              and res.get("msg")):
            # Roles explain their skips with a debug message: show it, never hide it.
            message = shorten(res["msg"])
            task.notes.setdefault(message, []).append(host)
        if status in ("failed", "unreachable"):
            self.gone = self.gone | {host}
            word = "FAILED" if status == "failed" else "UNREACHABLE"
            self.say(f"  {word} {host}: {task.title}: {message}")
        elif host in self.gone:  # a failure a rescue block handled: the host goes on
            self.gone = self.gone - {host}
        if self.per_host and status not in ("failed", "unreachable"):
            line = f"{status:<11} {data.get('task') or task.title}"
            self.say(f"    {host}: {line}" + (f": {message}" if message else ""))

    def stopped(self, running: dict[str, str], why: str) -> None:
        """The run was stopped: name the hosts that were in the middle of a task."""
        for host, task in running.items():
            self.say(f"  STOPPED {host} during {task}: {why}")

    # ---- ends of tasks and plays
    def _expected(self, task: TaskTally) -> int:
        """How many hosts the task runs on: the play's hosts once known, else the run's
        hosts still in it; never fewer than have started or answered."""
        play, gone = self.play, self.gone  # one reading: the refresh thread calls this too
        if play is not None and play.hosts:
            out_before = gone - set(task.hosts["failed"]) - set(task.hosts["unreachable"])
            expected = len(play.hosts - out_before)
        else:
            expected = len([h for h in self.run_hosts if h not in gone])
        return max(expected, task.done + len(task.running))

    def _end_task(self) -> None:
        task, self.task = self.task, None
        if task is None:
            return
        total = self._expected(task)
        if self.play is not None:
            for status in STATUSES:
                self.play.counts[status] += task.count(status)
            self.play.hosts = self.play.hosts.union(*task.hosts.values())
        if task.notable:
            worst = next((s for s in ("failed", "unreachable", "changed", "ignored")
                          if task.hosts[s]), "ok")
            self.say(f"  {worst:<11} {task.title}: {task.counts_text(total, self.order)} "
                     f"[{self.clock() - task.started:.1f} s]")
        # Notes that differ host by host (a message naming its host) would make a line
        # per host: the most common few print, the rest are counted.
        notes = sorted(task.notes.items(), key=lambda item: -len(item[1]))
        for message, hosts in notes[:FEW_HOSTS]:
            hosts = sorted(hosts, key=lambda h: (self.order.get(h, len(self.order)), h))
            names = name_hosts(hosts, total) or f"{len(hosts)} hosts"
            self.say(f"  note ({names}): {message}")
        if len(notes) > FEW_HOSTS:
            rest = notes[FEW_HOSTS:]
            self.say(f"  note: {len(rest)} other message(s) from {sum(len(h) for _, h in rest)} "
                     f"host(s) for {task.title}: see the hosts' logs in the run directory")

    def _end_play(self) -> None:
        play, self.play = self.play, None
        if play is None:
            return
        counts = ", ".join(f"{s} {n}" for s, n in play.counts.items() if n) or "no results"
        self.say(f"  done: {play.tasks} task(s) in {self.clock() - play.started:.1f} s: {counts}")

    # ---- the status area (terminal only)
    def status(self) -> Any:
        from rich.text import Text

        elapsed = _clock_text(self.clock() - self.started)
        play, task = self.play, self.task
        name = play.name if play else "starting"
        if task is None:
            return Text(f"{name} | elapsed {elapsed}", no_wrap=True, overflow="ellipsis")
        total = self._expected(task)
        head = f"{name} | task {self.task_number}: {task.title}"
        counts = "  ".join(f"{s} {task.count(s)}" for s in STATUSES[:5])
        tail = (f"hosts {task.done}/{total} done  {counts}  "
                f"task {_clock_text(self.clock() - task.started)}  elapsed {elapsed}")
        waiting = task.running if 0 < len(task.running) <= FEW_HOSTS else []
        if waiting:
            tail += f"  waiting on {', '.join(waiting)}"
        return Text(f"{head}\n{tail}", no_wrap=True, overflow="ellipsis")


def _clock_text(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:" if hours else "") + f"{rest // 60:02d}:{rest % 60:02d}"


__all__ = ["FEW_HOSTS", "RunConsole", "STATUSES", "TaskTally", "failure_message", "name_hosts",
           "result_status", "shorten", "task_title"]
