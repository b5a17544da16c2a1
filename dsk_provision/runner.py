"""ansible-runner wrapper: a console view of the run, a recap table and a run directory.

Each run gets a run directory (see rundir.py) holding:

- ``ansible/``: ansible-runner's private data dir; ``ansible/artifacts/<command>/`` keeps
  its artifacts (``job_events/*.json``, ``stdout``, ``rc``, ``status``),
- ``hosts/<host>.log``: every result for that host, in order,
- ``recap.json``: the per-host recap, failures, changed tasks and timings, the command,
  cluster and start time, and how the run ended (``state``: ``finished``, ``interrupted``
  by a signal, or ``timed out``; the hosts that were in the middle of a task when it was
  stopped). ``bootstrap --json`` prints it; ``runs list|show`` read it.

What the console shows while the run lasts is dsk_provision.runview's: the same size
whatever the node count, with every host's detail in ``hosts/<host>.log``.

A run holds its cluster's lock (dsk_provision.lock) and is watched (dsk_provision.runwatch):
SIGINT, SIGTERM and SIGHUP stop ansible-playbook and raise Interrupted, and a run that
sends no event for the idle timeout is stopped and fails, naming the hosts it waited on.

Failure messages come from a result's ``msg``/``stderr`` only, and never from a task
with ``no_log`` (Ansible censors those results; we keep them censored).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsk_provision.defaults import ANSIBLE_CFG
from dsk_provision.errors import DskError, EnvironmentProblem, Interrupted, RunFailed
from dsk_provision.files import make_private_dir, make_private_tree, open_private, write_private
from dsk_provision.lock import cluster_lock
from dsk_provision.rundir import RECAP_FILE, new_run_dir
from dsk_provision.runview import NOTE_ACTIONS, RunConsole, failure_message, result_status, shorten
from dsk_provision.runwatch import IDLE_TIMEOUT_ENV, POLL_S, RunWatch, idle_timeout_s
from dsk_provision.ssh_options import pinned_ssh_environment
from dsk_provision.state import cluster_state_dir

if TYPE_CHECKING:
    from rich.console import Console

    from dsk_provision.inventory import Inventory

REPO_DIR = Path(__file__).resolve().parent.parent
PLAYBOOKS_DIR = REPO_DIR / "playbooks"
ROLES_DIR = REPO_DIR / "roles"

RECAP_COLUMNS = ("ok", "changed", "failed", "unreachable", "skipped", "rescued")
# playbook_on_stats keys -> our recap names
_STATS_KEYS = {"ok": "ok", "changed": "changed", "failures": "failed", "dark": "unreachable",
               "skipped": "skipped", "rescued": "rescued", "ignored": "ignored"}


@dataclass
class PlaybookResult:
    run_dir: Path
    rc: int
    recap: dict[str, dict[str, int]]
    failed: dict[str, str] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    changed: dict[str, list[str]] = field(default_factory=dict)  # host -> tasks it changed
    # What recap.json holds (and `bootstrap --json` prints): this result and how the run
    # went (command, cluster, start, state ...).
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.failed and not self.unreachable

    def hosts(self) -> dict[str, dict[str, Any]]:
        """Per host: its recap counts, the tasks it changed, its failure."""
        return {h: {**counts, "changed_tasks": list(self.changed.get(h, [])),
                    "failure": self.failed.get(h), "unreachable_reason": self.unreachable.get(h)}
                for h, counts in self.recap.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["record"]
        d["run_dir"] = str(self.run_dir)
        d["ok"] = self.ok
        return d


class _HostState:
    __slots__ = ("ok", "changed", "failed", "unreachable", "skipped", "rescued")

    def __init__(self) -> None:
        self.ok = self.changed = self.failed = self.unreachable = 0
        self.skipped = self.rescued = 0


class _EventLog:
    """Turns ansible-runner events into per-host state and host logs; hands each event on
    to the console (dsk_provision.runview)."""

    def __init__(self, run_dir: Path, hosts: list[str], view: RunConsole):
        self.hosts: dict[str, _HostState] = {h: _HostState() for h in hosts}
        self.failed: dict[str, str] = {}
        self.unreachable: dict[str, str] = {}
        self.changed: dict[str, list[str]] = {}
        self.stats: dict[str, dict[str, int]] | None = None
        self.running: dict[str, str] = {}  # host -> the task it has started, not finished
        self.view = view
        self.logs_dir = run_dir / "hosts"
        make_private_dir(self.logs_dir)
        self._logs: dict[str, Any] = {}

    def __enter__(self) -> _EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self._logs.values():
            fh.close()

    def _state(self, host: str) -> _HostState:
        return self.hosts.setdefault(host, _HostState())

    def _log(self, host: str, line: str, stdout: str = "") -> None:
        fh = self._logs.get(host)
        if fh is None:
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in host)
            fh = self._logs[host] = open_private(self.logs_dir / f"{safe}.log", "a",
                                                  encoding="utf-8")
        fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        if stdout.strip():
            fh.write(stdout.rstrip() + "\n")
        fh.flush()

    def handle(self, event: dict) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host") or ""
        task = data.get("task") or ""
        res = data.get("res")
        status = result_status(event)
        message = ""

        if kind == "runner_on_start" and host:
            self.running[host] = task
        elif status in ("failed", "ignored", "unreachable"):
            message = failure_message(res)
            if status == "failed":
                self.failed.setdefault(host, f"{task}: {message}")
            elif status == "unreachable":
                self.unreachable.setdefault(host, message)
        elif status == "ok" and data.get("task_action") in NOTE_ACTIONS \
                and isinstance(res, dict) and res.get("msg"):
            message = shorten(str(res["msg"]))
        elif status == "changed":
            self.changed.setdefault(host, []).append(task)
        elif kind == "playbook_on_stats":
            self.stats = {}
            for src, dst in _STATS_KEYS.items():
                for h, n in (data.get(src) or {}).items():
                    self.stats.setdefault(h, dict.fromkeys(RECAP_COLUMNS + ("ignored",), 0))
                    self.stats[h][dst] = int(n)

        if status:
            self.running.pop(host, None)
            st = self._state(host)
            if status in ("ok", "changed", "failed", "unreachable", "skipped"):
                setattr(st, status, getattr(st, status) + 1)
            if status == "changed":
                st.ok += 1  # Ansible counts a changed result as ok too
            line = f"{status:<11} {task}" + (f": {message}" if message else "")
            self._log(host, line, event.get("stdout") or "")
        self.view.handle(event)
        return True  # keep every event in the artifacts

    def mark_stopped(self, why: str) -> None:
        """A stopped run: say so in the log of every host that was running a task."""
        for host, task in self.running.items():
            self._log(host, f"stopped     {task}: {why}")
        self.view.stopped(self.running, why)

    def recap(self) -> dict[str, dict[str, int]]:
        if self.stats is not None:
            recap = self.stats
            for h in self.hosts:
                recap.setdefault(h, dict.fromkeys(RECAP_COLUMNS + ("ignored",), 0))
            return recap
        # No stats event (the play never started): fall back to what the events showed.
        return {h: {"ok": s.ok, "changed": s.changed, "failed": s.failed,
                    "unreachable": s.unreachable, "skipped": s.skipped, "rescued": s.rescued,
                    "ignored": 0}
                for h, s in self.hosts.items()}


def render_recap(result: PlaybookResult, console: Console, *, per_host: bool = False,
                 run_dir_line: bool = True) -> None:
    """The recap table. Hosts with the same counts share a row (named when they are a
    few, counted otherwise), so that the table grows with the ways hosts differ, not with
    their number; ``per_host``: one row per host."""
    from rich.table import Table

    from dsk_provision.runview import name_hosts

    if per_host:
        rows = [[host] for host in result.recap]
    else:
        groups: dict[tuple[int, ...], list[str]] = {}
        for host, counts in result.recap.items():
            groups.setdefault(tuple(counts.get(c, 0) for c in RECAP_COLUMNS), []).append(host)
        rows = list(groups.values())
    table = Table(title=f"recap ({result.elapsed_s:.1f} s)", title_justify="left")
    table.add_column("host")
    for col in RECAP_COLUMNS:
        table.add_column(col, justify="right")
    for hosts in rows:
        counts = result.recap[hosts[0]]
        bad = counts.get("failed") or counts.get("unreachable")
        label = name_hosts(hosts, 0) or f"{len(hosts)} hosts ({hosts[0]} ... {hosts[-1]})"
        table.add_row(label, *(str(counts.get(c, 0)) for c in RECAP_COLUMNS),
                      style="red" if bad else None)
    console.print(table)
    if run_dir_line:
        console.print(f"run directory: {result.run_dir}", markup=False, highlight=False,
                      soft_wrap=True)


def _resolve_playbook(playbook: str) -> tuple[Path, str]:
    path = Path(playbook)
    if path.is_absolute():
        project = path.parent
    else:
        project = PLAYBOOKS_DIR
        path = project / playbook
    if not path.is_file():
        raise EnvironmentProblem(f"playbook {playbook} not found at {path}",
                                 hint="run from a complete checkout of dsk-provision")
    return project, path.name


def run_playbook(playbook: str, inventory: Inventory, *, command: str,
                 runs_dir: Path | None = None, limit: list[str] | None = None,
                 tags: list[str] | None = None, extra_vars: dict | None = None,
                 check: bool = False, console: Console | None = None,
                 verbosity: int = 0, idle_timeout: float | None = None) -> PlaybookResult:
    """Run ``playbook`` (a name under playbooks/, or an absolute path) against ``inventory``.

    Shows the run on the console (dsk_provision.runview), prints a recap table, and
    returns the result. Raises RunFailed naming every failed or unreachable host with its
    first error, ClusterBusy when another run holds the cluster's lock, Interrupted when a
    signal stopped the run; the run's record (recap.json) rides on the error as ``record``.
    ``idle_timeout``: seconds without an event before the run is stopped (default:
    runwatch.idle_timeout_s()).
    """
    try:
        import ansible_runner
    except ImportError as exc:
        raise EnvironmentProblem(f"ansible-runner is not installed ({exc})",
                                 hint="pip install -e . in the project's virtualenv") from None
    from rich.console import Console

    console = console or Console()
    project_dir, playbook_name = _resolve_playbook(playbook)
    if limit:
        known = {n.name for n in inventory.nodes}
        unknown = [h for h in limit if h not in known and not any(c in h for c in "*:!&[")]
        if unknown:
            from dsk_provision.errors import InputError

            raise InputError(f"--limit names hosts that are not nodes: {', '.join(unknown)} "
                             f"(nodes: {', '.join(sorted(known))})", field="--limit")

    idle = idle_timeout_s(idle_timeout)
    # A check-mode run changes nothing, here or on the nodes: before the cluster's first
    # run it makes no state directory, not even for the lock (nothing is there to guard).
    # Once the directory exists it takes the lock like every other run.
    unguarded = check and not cluster_state_dir(inventory.cluster_name).exists()
    with nullcontext() if unguarded else cluster_lock(inventory.cluster_name, command):
        return _run_locked(ansible_runner, project_dir, playbook_name, inventory,
                           command=command, runs_dir=runs_dir, limit=limit, tags=tags,
                           extra_vars=extra_vars, check=check, console=console,
                           verbosity=verbosity, idle=idle)


def _run_locked(ansible_runner: Any, project_dir: Path, playbook_name: str,
                inventory: Inventory, *, command: str, runs_dir: Path | None,
                limit: list[str] | None, tags: list[str] | None, extra_vars: dict | None,
                check: bool, console: Console, verbosity: int, idle: float) -> PlaybookResult:
    """The body of run_playbook, inside the cluster's lock."""
    # The cluster's state directory (its key): claimed for this inventory before any run,
    # under the lock, so that two runs never claim or make a key at once.
    from dsk_provision.trust import playbook_vars

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    extra_vars = {**playbook_vars(inventory, check=check, say=say), **(extra_vars or {})}

    run_dir = new_run_dir(command, runs_dir)
    private = run_dir / "ansible"
    make_private_dir(private / "tmp")
    envvars = {
        "ANSIBLE_CONFIG": str(ANSIBLE_CFG),
        "ANSIBLE_ROLES_PATH": str(ROLES_DIR),
        "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
        # modules run on this machine (delegate_to: localhost, local connections) unpack
        # into TMPDIR; one killed mid-task (an interrupted or timed-out run) leaves its
        # files in the run's record, not in the system's temp
        "TMPDIR": str(private / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        # ansible.cfg pins host keys; a caller's ANSIBLE_HOST_KEY_CHECKING=False would
        # override it, so the environment handed to Ansible says so too.
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        # ... and so do the caller's ssh arguments and ssh program (keep-alives, pinning)
        **pinned_ssh_environment(),
        # ansible-playbook must come from the same environment as this process.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                 os.environ.get("PATH", "/usr/bin:/bin")]),
    }
    hosts = [n.name for n in inventory.nodes if not limit or n.name in limit]
    if limit and not hosts:
        hosts = list(limit)
    live = console.is_terminal and not os.environ.get("DSK_PLAIN_PROGRESS")
    started = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    console.print(f"{command}: {playbook_name} on {len(hosts)} host(s); run directory {run_dir}",
                  markup=False, highlight=False, soft_wrap=True)
    watch = RunWatch(idle)

    with (RunConsole(console, hosts, live=live, per_host=verbosity > 0) as screen,
          _EventLog(run_dir, hosts, screen) as view, watch):
        def on_event(event: dict) -> bool:
            watch.note_event()
            return view.handle(event)

        runner = ansible_runner.run(
            private_data_dir=str(private),
            project_dir=str(project_dir),
            playbook=playbook_name,
            inventory=str(Path(inventory.ansible_inventory_path).resolve()),
            ident=command,
            envvars=envvars,
            extravars=extra_vars,
            limit=",".join(limit) if limit else None,
            tags=",".join(tags) if tags else None,
            cmdline="--check --diff" if check else None,
            verbosity=verbosity or None,
            event_handler=on_event,
            cancel_callback=watch.cancel_requested,
            settings={"pexpect_timeout": POLL_S},
            quiet=True,
            json_mode=False,
        )
        stopped = runner.status == "canceled" and watch.cancelled
        if stopped:
            # ansible-runner killed ansible-playbook's process group; anything of the run
            # that left it (or outlived the kill) is stopped here, by PID.
            watch.reap()
            why = (f"interrupted by {watch.signal_name}" if watch.signum
                   else f"no event for {idle:g} s")
            view.mark_stopped(why)
        screen.finish()  # the last task's and play's lines, before the recap
        # Signals stay caught until the recap is written: a second Ctrl-C cannot cut it.
        # ansible-runner writes its artifacts with the umask's modes: close them down too.
        make_private_tree(private)
        elapsed = time.monotonic() - started
        rc = int(runner.rc if runner.rc is not None else 1)
        result = PlaybookResult(run_dir=run_dir, rc=rc, recap=view.recap(),
                                failed=view.failed, unreachable=view.unreachable,
                                elapsed_s=round(elapsed, 2), changed=view.changed)
        state = "finished"
        if stopped:
            state = "interrupted" if watch.signum else "timed out"
        record = {**result.to_dict(), "playbook": playbook_name, "command": command,
                  "cluster": inventory.cluster_name, "started": started_at,
                  "check": check, "limit": limit, "tags": tags, "status": runner.status,
                  "state": state, "signal": watch.signal_name or None,
                  "idle_timeout_s": idle, "running": dict(view.running) if stopped else {},
                  "stragglers_stopped": [p.pid for p in watch.stopped],
                  "hosts": result.hosts()}
        write_private(run_dir / RECAP_FILE, json.dumps(record, indent=2) + "\n")
    result.record = record
    render_recap(result, console, per_host=verbosity > 0)

    running = [f"{h} ({t})" for h, t in view.running.items()]
    if watch.signum:
        what = ("stopped ansible-playbook" if stopped
                else "ansible-playbook had already ended")
        raise _with_record(Interrupted(
            watch.signum,
            f"{command} interrupted by {watch.signal_name}: {what}"
            + (f"; in the middle of a task: {', '.join(running)}" if stopped and running
               else ""),
            hint=f"recap in {run_dir / RECAP_FILE}; run {command} again to converge"), record)
    if stopped:
        lines = [f"{command}: no event from ansible-playbook for {idle:g} s: stopped it"
                 + (f"; still waiting on {', '.join(running)}" if running else "")]
        lines += [f"  {h}: {msg}" for h, msg in view.failed.items()]
        lines += [f"  {h}: unreachable: {msg}" for h, msg in view.unreachable.items()]
        raise _with_record(RunFailed(
            "\n".join(lines), nodes=list(dict.fromkeys([*view.running, *view.failed,
                                                        *view.unreachable])),
            hint=f"per-host logs in {run_dir / 'hosts'}; if a task really takes "
                 f"longer, set {IDLE_TIMEOUT_ENV} (seconds)"), record)

    if result.failed or result.unreachable:
        bad = list(result.failed) + [h for h in result.unreachable if h not in result.failed]
        lines = [f"{command} failed on {len(bad)} host(s): {', '.join(bad)}"]
        lines += [f"  {h}: {msg}" for h, msg in result.failed.items()]
        lines += [f"  {h}: unreachable: {msg}" for h, msg in result.unreachable.items()]
        failure = _with_record(RunFailed("\n".join(lines), nodes=bad,
                                         hint=f"per-host logs in {run_dir / 'hosts'}"), record)
        # The run finished: every other host completed its plays (callers read which).
        failure.result = result
        raise failure
    if rc != 0:
        raise _with_record(RunFailed(
            f"{command}: ansible-playbook exited with code {rc} "
            f"({runner.status}): {_stdout_tail(runner)}",
            hint=f"full output in {private / 'artifacts' / command / 'stdout'}"), record)
    return result


def _with_record(error: DskError, record: dict[str, Any]) -> DskError:
    """The run's record on its error: the CLI's --json still prints it."""
    error.record = record
    return error


def _stdout_tail(runner: Any, lines: int = 4) -> str:
    try:
        text = runner.stdout.read()
    except (OSError, AttributeError, ValueError):
        return "no output"
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) if tail else "no output"
