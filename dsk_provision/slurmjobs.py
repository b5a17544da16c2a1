"""Slurm jobs as named jobs: what `jobs list|status|logs|stop` do for a job of the slurm
launcher.

A job submitted by `train --launcher slurm` is recorded on the control node, in the
cluster's state directory (``slurm_jobs/<name>.json``, 0600): its name, Slurm's job id,
its run directory on the nodes and, once Slurm has placed it, its nodes and last known
state. The jobs commands look there first; a name without a record is a job of the SSH
launcher (dsk_provision.jobs).

- state: ``scontrol show job`` on the controller (squeue's view, with the exit code and
  the reason), else ``sacct`` where the cluster keeps accounting, else the state last
  recorded (Slurm forgets an ended job after MinJobAge, 300 s by default, and the slurm
  role sets up no accounting database);
- logs: the job's output file, ``slurm-<job id>.out`` in the run directory of its first
  node (one line per line a task printed, labelled with the task, which is the node's
  index in the job's node list);
- stop: SIGTERM to the job's steps (torchrun passes it to the ranks, which save a
  checkpoint at the next step), then ``scancel`` once the grace is over, then a check on
  every node of the job that no process carries the run's marker any more.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

from dsk_provision.errors import InputError, RunFailed
from dsk_provision.jobviews import PROBE_TIMEOUT_S, JobStatus, NodeView, StopResult
from dsk_provision.remote import TransportChoice, on_nodes, resolve_transport, run_command
from dsk_provision.slurmctl import (
    POLL_S,
    STATES,
    UNDER_WAY,
    cancel,
    controller,
    follow_command,
    job_state,
)

RECORD_DIR = "slurm_jobs"
# How long a stop waits, after scancel, for Slurm and the nodes to have nothing left.
STOP_SETTLE_S = 90.0
_LABEL_RE = re.compile(r"^\s*(?P<task>\d+): (?P<text>.*)$")
_LOCAL_RANK_RE = re.compile(r"^\[default(?P<local>\d+)\]:")


@dataclass
class SlurmJob:
    """What the control node knows of one Slurm job."""

    name: str
    job_id: str
    run_id: str
    remote_dir: str                 # the run directory on every node
    nproc_per_node: int
    submitted: float
    nodes: list[str] = field(default_factory=list)   # Slurm's allocation, in task order
    state: str = "PENDING"          # Slurm's state, as last seen
    exit_code: str = ""
    reason: str = ""
    batch_host: str = ""
    stop_requested: bool = False

    @property
    def output(self) -> PurePosixPath:
        return PurePosixPath(self.remote_dir) / f"slurm-{self.job_id}.out"


def job_state_name(slurm_state: str | None, stop_requested: bool = False) -> str:
    """The jobs commands' state (pending, running, stopping, finished, failed, stopped,
    unknown) of a Slurm job state; a job stopped on request is 'stopped' whatever Slurm
    calls its end."""
    base = (slurm_state or "").split()[0].rstrip("+") if slurm_state else ""
    state = STATES.get(base, "unknown")
    if stop_requested:
        if state in ("running", "pending"):
            return "stopping"
        if state in ("failed", "finished", "stopped"):
            return "stopped"
    return state


def active(slurm_state: str) -> bool:
    return job_state_name(slurm_state) in UNDER_WAY


# --------------------------------------------------------------------------- records


def _record_dir(inventory) -> Path:
    from dsk_provision.state import cluster_state_dir

    return cluster_state_dir(inventory.cluster_name) / RECORD_DIR


def save(inventory, job: SlurmJob) -> None:
    from dsk_provision.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, write_file

    write_file(_record_dir(inventory) / f"{job.name}.json",
               json.dumps(asdict(job), indent=2) + "\n", PRIVATE_FILE_MODE,
               dir_mode=PRIVATE_DIR_MODE)


def _from_dict(data: dict) -> SlurmJob:
    known = {f.name for f in fields(SlurmJob)}
    return SlurmJob(**{k: v for k, v in data.items() if k in known})


def load(inventory, name: str) -> SlurmJob | None:
    """The record of Slurm job ``name``; None when there is none (an SSH job's name)."""
    path = _record_dir(inventory) / f"{name}.json"
    try:
        return _from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot be read: {exc}", file=str(path)) from exc


def records(inventory) -> list[SlurmJob]:
    directory = _record_dir(inventory)
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            found.append(_from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue
    return found


# --------------------------------------------------------------------------- Slurm's view


def sacct_command(job_id: str) -> str:
    return (f"sacct -n -X -P -j {shlex.quote(job_id)} "
            "-o JobID,State,ExitCode,NodeList,Reason 2>/dev/null")


def parse_sacct(text: str, job_id: str) -> dict | None:
    """sacct's line of the job (-X -P: JobID|State|ExitCode|NodeList|Reason), or None."""
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[0] == job_id:
            return {"state": parts[1].split()[0], "exit_code": parts[2],
                    "nodes": parts[3], "reason": parts[4] if len(parts) > 4 else ""}
    return None


def expand_nodes(inventory, nodelist: str, *, transport: TransportChoice = None) -> list[str]:
    """Slurm's node list ('node[1-3]') as names, in Slurm's order (task i runs on the
    i-th), expanded by `scontrol show hostnames` on the controller."""
    if not nodelist or nodelist in ("(null)", "None assigned"):
        return []
    node = controller(inventory)
    rc, out = run_command(resolve_transport(transport, inventory, node), node,
                          f"scontrol show hostnames {shlex.quote(nodelist)}", timeout=60)
    return [x.strip() for x in out.splitlines() if x.strip()] if rc == 0 else []


def refresh(inventory, job: SlurmJob, *, transport: TransportChoice = None) -> SlurmJob:
    """The record with Slurm's view now (scontrol, else sacct), saved; unchanged when
    Slurm no longer knows the job."""
    seen = job_state(inventory, job.job_id, transport=transport)
    if seen is not None:
        job.state, job.exit_code, job.reason = seen.state, seen.exit_code, seen.reason
        if seen.batch_host not in ("", "(null)"):
            job.batch_host = seen.batch_host
        nodelist = seen.nodes
    else:
        node = controller(inventory)
        rc, out = run_command(resolve_transport(transport, inventory, node), node,
                              sacct_command(job.job_id), timeout=60)
        row = parse_sacct(out, job.job_id) if rc == 0 else None
        if row is None:
            return job
        job.state, job.exit_code, job.reason = row["state"], row["exit_code"], row["reason"]
        nodelist = row["nodes"]
    if not job.nodes and nodelist not in ("", "(null)"):
        job.nodes = expand_nodes(inventory, nodelist, transport=transport)
    if not job.batch_host and job.nodes:
        job.batch_host = job.nodes[0]
    save(inventory, job)
    return job


def marker_count_command(run_id: str) -> str:
    """The PIDs of the processes on a node that carry the run's marker (launch.run_marker:
    torchrun and every rank inherit it), one a line."""
    from dsk_provision.launch import run_marker

    return (f"grep -lsxzF -- {shlex.quote(run_marker(run_id))} /proc/[0-9]*/environ "
            "| cut -d/ -f3; true")


def _left_on_nodes(inventory, job: SlurmJob, *, transport: TransportChoice = None
                   ) -> tuple[dict[str, list[int]], list[str]]:
    """{node: PIDs of the run still alive} and the nodes that did not answer."""
    targets = [n for n in inventory.nodes if n.name in job.nodes]
    results = on_nodes(inventory, targets, lambda n: marker_count_command(job.run_id),
                       timeout=PROBE_TIMEOUT_S, transport=transport)
    left, silent = {}, []
    for name, (rc, out) in results.items():
        if rc != 0:
            silent.append(name)
            continue
        pids = [int(x) for x in out.split() if x.isdigit()]
        if pids:
            left[name] = pids
    return left, silent


# --------------------------------------------------------------------------- the commands


def status(inventory, job: SlurmJob, *, transport: TransportChoice = None):
    """A jobs.JobStatus of the Slurm job: Slurm's state, and per node of the job how many
    of its processes run there."""
    job = refresh(inventory, job, transport=transport)
    state = job_state_name(job.state, job.stop_requested)
    left, silent = _left_on_nodes(inventory, job, transport=transport)
    code = job.exit_code.split(":")[0] if job.exit_code else ""
    views = []
    for name in job.nodes:
        if name in silent:
            views.append(NodeView(name, reachable=False, error="no answer"))
            continue
        views.append(NodeView(name, reachable=True, exists=True, running=bool(left.get(name)),
                              state=state, processes=len(left.get(name, [])),
                              exit_code=int(code) if code.isdigit() and not active(job.state)
                              else None, stop_requested=job.stop_requested))
    culprit = None
    if state == "failed":
        culprit = f"Slurm: {job.state}" + (f", {job.reason}" if job.reason not in
                                           ("", "None") else "")
    return JobStatus(job.name, state, views, None, None, culprit, None,
                     slurm=slurm_facts(job))


def slurm_facts(job: SlurmJob) -> dict:
    return {"job_id": job.job_id, "state": job.state, "exit_code": job.exit_code,
            "reason": job.reason, "nodes": job.nodes, "run_dir": job.remote_dir}


def list_statuses(inventory, *, transport: TransportChoice = None):
    """A JobStatus for every recorded Slurm job (one scontrol query each, no node probe)."""
    out = []
    for job in records(inventory):
        try:
            job = refresh(inventory, job, transport=transport)
        except (InputError, RunFailed):
            pass   # the state last recorded
        state = job_state_name(job.state, job.stop_requested)
        views = [NodeView(n, reachable=True, exists=True, state=state) for n in job.nodes]
        out.append(JobStatus(job.name, state, views, None, None, slurm=slurm_facts(job)))
    return out


def stop(inventory, job: SlurmJob, *, grace_s: float, transport: TransportChoice = None):
    """SIGTERM to the job's steps, scancel after ``grace_s`` (or once the job ended), then
    wait until Slurm says it ended and no process of the run is left on its nodes."""
    job = refresh(inventory, job, transport=transport)
    was_active = active(job.state)
    job.stop_requested = True
    save(inventory, job)
    node = controller(inventory)
    escalated: dict[str, str] = {}
    if was_active:
        run_command(resolve_transport(transport, inventory, node), node,
                    f"scancel --signal=TERM {shlex.quote(job.job_id)}", timeout=60)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and active(job.state):
            time.sleep(POLL_S)
            job = refresh(inventory, job, transport=transport)
        if active(job.state):
            escalated = {n: "KILL" for n in job.nodes}   # Slurm's TERM, then KILL
        cancel(inventory, job.job_id, transport=transport)
    deadline = time.monotonic() + STOP_SETTLE_S
    while True:
        job = refresh(inventory, job, transport=transport)
        left, silent = _left_on_nodes(inventory, job, transport=transport)
        if (not active(job.state) and not left) or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    return StopResult(job.name, list(job.nodes) if was_active else [], escalated, left,
                      silent, None)


def label_filter(line: str, nodes: list[str], nproc: int, *, node: str | None = None,
                 rank: int | None = None) -> str | None:
    """A line of the job's output as the ssh launcher's jobs show theirs: '[node rank R]
    text' (srun's task label is the node's index in the job's node list, torchrun's
    '[default<local rank>]:' prefix gives the rank), or '[node] text' for a line of the
    node's torchrun itself; None when --node or --rank leave it out. Lines without a
    label (Slurm's own) are kept unless a node or rank is asked for."""
    match = _LABEL_RE.match(line)
    if match is None:
        return None if node or rank is not None else line
    task = int(match["task"])
    name = nodes[task] if task < len(nodes) else f"task{task}"
    if node is not None and name != node:
        return None
    text = match["text"]
    local = _LOCAL_RANK_RE.match(text)
    if local is None:
        return None if rank is not None else f"[{name}] {text}"
    global_rank = task * nproc + int(local["local"])
    if rank is not None and global_rank != rank:
        return None
    return f"[{name} rank {global_rank}] {text[local.end():]}"


def logs_command(job: SlurmJob, *, follow: bool, lines: int | None) -> str:
    path = shlex.quote(str(job.output))
    if follow:
        return follow_command(job.output, job.job_id)
    tail = f"tail -n {lines}" if lines is not None else "cat"
    return f"{tail} {path}"


def print_logs(inventory, job: SlurmJob, *, node: str | None = None, rank: int | None = None,
               follow: bool = False, lines: int | None = None, out=None,
               transport: TransportChoice = None) -> int:
    """The job's output from its first node, each line as '[node] text'; with
    ``follow``, until the job ends. 1 when it could not be read."""
    import sys

    from dsk_provision.remote import find_node

    out = out or sys.stdout
    job = refresh(inventory, job, transport=transport)
    if not job.batch_host:
        out.write(f"job {job.name} (Slurm job {job.job_id}) has not started: "
                  f"{job.state} {job.reason}\n")
        return 0
    host = find_node(inventory, job.batch_host)
    proc = resolve_transport(transport, inventory, host).popen(
        host, logs_command(job, follow=follow, lines=lines))
    try:
        for raw in proc.stdout:
            shown = label_filter(raw.rstrip("\n"), job.nodes, job.nproc_per_node,
                                 node=node, rank=rank)
            if shown is not None:
                out.write(shown + "\n")
                out.flush()
    finally:
        proc.wait()
    if proc.returncode != 0:
        out.write(f"[{host.name}] could not read {job.output} (exit {proc.returncode})\n")
        return 1
    return 0


__all__ = ["SlurmJob", "active", "job_state_name", "label_filter", "list_statuses", "load",
           "logs_command", "marker_count_command", "parse_sacct", "print_logs", "records",
           "refresh", "save", "status", "stop"]
