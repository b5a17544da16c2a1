"""Named training jobs: start them detached on every node, follow, stop, ask how they do.

A job has a name and one directory per node, ``{dsk_root}/jobs/<name>/``, that outlives
the launch (trainer/job.py describes what is in it). Its checkpoints go to
``<job dir>/checkpoints``, or to ``<dsk_checkpoint_dir>/<name>`` when the inventory names
a file system that every node mounts. Launching the same name again continues from the
newest complete checkpoint; ``fresh=True`` removes the job's outputs first.

On every node the job runs under ``python -m trainer.job run`` (the supervisor), started
with ``setsid -f`` so that it leads a session of its own and depends on no SSH session of
this machine. The control node talks to the nodes through dsk_provision.remote: one
short command per node, in parallel, each with a time limit (status, stop, logs), or one
long-lived ``trainer.job logs --follow`` per node while it follows the job.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from dsk_provision.errors import InputError, RunFailed
from dsk_provision.jobviews import PROBE_TIMEOUT_S, JobStatus, NodeView, StopResult
from dsk_provision.remote import TransportChoice, on_nodes, resolve_transport, run_command

JOB_MARKER_VAR = "DSK_JOB"        # trainer.job.JOB_MARKER_VAR
JOB_DIR_VAR = "DSK_JOB_DIR"       # trainer.jobstate.JOB_DIR_VAR
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# How long a stop waits for the ranks to save their checkpoint and end before it
# escalates to SIGTERM for every process of the job, then SIGKILL.
STOP_GRACE_S = 120.0
LINE_RE = re.compile(r"^\[(?P<node>[^\] ]+)(?: rank (?P<rank>\d+))?\] ?(?P<text>.*)$")


# --------------------------------------------------------------------------- names, paths


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise InputError(f"{name!r} is not a job name: use letters, digits, '.', '_', '-' "
                         "(up to 64, starting with a letter or digit)", field="--name")
    return name


def default_name(config_path: Path, now: float | None = None) -> str:
    """<config file stem>-<YYYYmmdd-HHMMSS>."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config_path).stem).strip("-.") or "job"
    return check_name(f"{stem[:40]}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")


def job_dir(node, name: str) -> PurePosixPath:
    return node.settings.job_dir(name)


def _q(value) -> str:
    return shlex.quote(str(value))


def _job_python(node, name: str, args: str) -> str:
    """A trainer.job command run in the job's directory with the node's Python (no job
    marker: it is not part of the job)."""
    d = job_dir(node, name)
    return (f"cd {_q(d)} 2>/dev/null || {{ echo 'no job {name} here'; exit 3; }}; "
            f"PYTHONPATH={_q(d)} exec {_q(node.settings.python)} -m trainer.job {args}")


# --------------------------------------------------------------------------- a node's answer


def _last_json(output: str) -> dict | None:
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


# --------------------------------------------------------------------------- status


def _node_view(name: str, rc: int, out: str) -> NodeView:
    data = _last_json(out) if rc == 0 else None
    if data is None:
        if rc == 3:
            return NodeView(name, reachable=True, exists=False)
        why = "no answer" if rc == 124 else (out.strip().splitlines() or [f"exit {rc}"])[-1]
        return NodeView(name, reachable=False, error=why)
    record = data.get("record") or {}
    return NodeView(name, reachable=True, exists=bool(data.get("job")) or bool(record),
                    running=bool(data.get("running")), state=record.get("state"),
                    exit_code=record.get("exit_code"), ended=record.get("ended"),
                    launch=record.get("launch"), processes=int(data.get("processes") or 0),
                    stop_requested=bool(data.get("stop_requested")),
                    trainer=data.get("trainer"), checkpoint=data.get("checkpoint"),
                    job=data.get("job") or {}, reason=record.get("reason"),
                    lost_node=record.get("lost_node"))


def combine(name: str, views: list[NodeView], culprit_hint: Callable[[str], str | None]
            | None = None) -> JobStatus:
    """The job's state from each node's view."""
    trainer = next((v.trainer for v in views if v.trainer), None)
    ckpts = [v.checkpoint for v in views if v.checkpoint]
    checkpoint = max(ckpts, key=lambda c: c["step"]) if ckpts else None
    present = [v for v in views if v.exists]
    if not present and all(v.reachable for v in views):
        raise InputError(f"no job named {name!r} on any node", field="NAME",
                         hint="dsk-provision jobs list -i INVENTORY")
    stop_requested = any(v.stop_requested for v in present)
    culprit = culprit_node = None
    lost = [v for v in present if v.lost_node and not v.running and v.state == "failed"]
    if any(v.running for v in present):
        state = "stopping" if stop_requested else "running"
    elif lost:
        # The ranks on the other nodes saw a node die (trainer/resilience.py) and ended
        # the job: it is the culprit, whether or not it answers now.
        state, culprit_node = "failed", lost[0].lost_node
        culprit = f"{culprit_node} (lost)"
    elif any(not v.reachable for v in views):
        state = "unknown"
    elif stop_requested:
        state = "stopped"
    else:
        failed = [v for v in present if v.state == "failed"
                  or (v.state == "running" and not v.running)]
        if failed:
            state = "failed"
            first = min(failed, key=lambda v: v.ended or float("inf"))
            culprit_node = first.node
            culprit = (culprit_hint(first.node) if culprit_hint else None) or first.node
        elif trainer and trainer.get("state") == "stopped":
            state = "stopped"
        elif present and all(v.state == "finished" for v in present):
            state = "finished"
        else:
            state = "unknown"
    return JobStatus(name, state, views, trainer, checkpoint, culprit, culprit_node)


def job_status(inventory, name: str, *, transport: TransportChoice = None,
               timeout: float = PROBE_TIMEOUT_S, blame: bool = True) -> JobStatus:
    """One probe per node, in parallel, each within ``timeout``. A job of the slurm
    launcher: Slurm's view of it (dsk_provision.slurmjobs)."""
    check_name(name)
    if (slurm_job := _slurm_job(inventory, name)) is not None:
        from dsk_provision import slurmjobs

        return slurmjobs.status(inventory, slurm_job, transport=transport)
    results = on_nodes(inventory, inventory.nodes,
                       lambda n: _job_python(n, name, f"status --node {_q(n.name)}"),
                       timeout=timeout, transport=transport)
    views = [_node_view(n.name, *results[n.name]) for n in inventory.nodes]

    def hint(node_name: str) -> str | None:
        return blame_rank(inventory, name, node_name, transport=transport) if blame else None

    return combine(name, views, hint)


def _slurm_job(inventory, name: str):
    """The control node's record of Slurm job ``name``, or None (a job of the ssh launcher)."""
    from dsk_provision import slurmjobs

    return slurmjobs.load(inventory, name)


def blame_rank(inventory, name: str, node_name: str, *,
               transport: TransportChoice = None) -> str | None:
    """'rank R on NODE' from torchrun's failure report in the node's log."""
    from dsk_provision.launch import failed_rank

    node = inventory.node(node_name) if hasattr(inventory, "node") else None
    if node is None:
        return None
    log = job_dir(node, name) / "logs" / f"node-{node.name}.log"
    rc, out = run_command(resolve_transport(transport, inventory, node), node,
                          f"tail -n 400 {_q(log)}", timeout=PROBE_TIMEOUT_S)
    rank = failed_rank(out) if rc == 0 else None
    return f"rank {rank} on {node_name}" if rank is not None else None


# --------------------------------------------------------------------------- list


_LIST_SCRIPT = r"""
cd {jobs} 2>/dev/null || exit 0
for d in */; do
  d=${{d%/}}; [ -f "$d/job.json" ] || continue
  (cd "$d" && PYTHONPATH="$PWD" {python} -m trainer.job status --node {node}) || true
done
"""


def list_jobs(inventory, *, transport: TransportChoice = None,
              timeout: float = PROBE_TIMEOUT_S) -> tuple[list[JobStatus], list[str]]:
    """Every job that has a directory on some node; and the nodes that did not answer."""
    def command(node) -> str:
        script = _LIST_SCRIPT.format(jobs=_q(node.settings.root / "jobs"),
                                     python=_q(node.settings.python), node=_q(node.name))
        return f"sh -c {_q(script)}"

    results = on_nodes(inventory, inventory.nodes, command, timeout=timeout,
                       transport=transport)
    per_job: dict[str, dict[str, NodeView]] = {}
    silent = []
    for node in inventory.nodes:
        rc, out = results[node.name]
        if rc != 0:
            silent.append(node.name)
            continue
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            job_name = (data.get("job") or {}).get("name")
            if job_name:
                per_job.setdefault(job_name, {})[node.name] = _node_view(
                    node.name, 0, line)
    jobs = []
    for job_name, views in sorted(per_job.items()):
        all_views = [views.get(n.name) or NodeView(n.name, reachable=n.name not in silent)
                     for n in inventory.nodes]
        jobs.append(combine(job_name, all_views))
    from dsk_provision import slurmjobs

    jobs += slurmjobs.list_statuses(inventory, transport=transport)
    return jobs, silent


# --------------------------------------------------------------------------- stop


def stop_job(inventory, name: str, *, grace_s: float = STOP_GRACE_S,
             transport: TransportChoice = None, nodes=None) -> StopResult:
    """Stop the job on every node at once: its ranks get SIGTERM (the trainer saves a
    checkpoint at the next step boundary and exits), then, after ``grace_s``, every
    process of the job gets SIGTERM and 10 s later SIGKILL. Returns when nothing of it
    is left (or a node did not answer). A Slurm job: through Slurm (slurmjobs.stop)."""
    check_name(name)
    if (slurm_job := _slurm_job(inventory, name)) is not None:
        from dsk_provision import slurmjobs

        return slurmjobs.stop(inventory, slurm_job, grace_s=grace_s, transport=transport)
    targets = list(nodes or inventory.nodes)
    results = on_nodes(inventory, targets,
                       lambda n: _job_python(n, name, f"stop --node {_q(n.name)} "
                                             f"--grace {grace_s:g}"),
                       timeout=grace_s + 60, transport=transport)
    if all(rc == 3 for rc, _out in results.values()):
        raise InputError(f"no job named {name!r} on any node", field="NAME",
                         hint="dsk-provision jobs list -i INVENTORY")
    stopped, escalated, left, unreachable = [], {}, {}, []
    for node in targets:
        rc, out = results[node.name]
        if rc == 3:
            continue  # no job directory there
        data = _last_json(out) if rc == 0 else None
        if data is None:
            unreachable.append(node.name)
            continue
        if data.get("had_supervisor") or data.get("ranks_signalled") or data.get("escalated"):
            stopped.append(node.name)
        if data.get("escalated"):
            escalated[node.name] = data["escalated"]
        if data.get("left"):
            left[node.name] = data["left"]
    checkpoint = None
    try:
        checkpoint = job_status(inventory, name, transport=transport, blame=False).checkpoint
    except (InputError, RunFailed):
        pass
    return StopResult(name, stopped, escalated, left, unreachable, checkpoint)


# --------------------------------------------------------------------------- logs


def print_logs(inventory, name: str, *, node: str | None = None, rank: int | None = None,
               follow: bool = False, lines: int | None = None, out=None,
               transport: TransportChoice = None) -> int:
    """Print the job's logs from every node (or one), each line prefixed with its node
    and rank; with ``follow``, until the job has ended on those nodes. Returns 1 when a
    node could not be read, else 0."""
    import sys

    check_name(name)
    if (slurm_job := _slurm_job(inventory, name)) is not None:
        from dsk_provision import slurmjobs

        return slurmjobs.print_logs(inventory, slurm_job, node=node, rank=rank,
                                    follow=follow, lines=lines, out=out, transport=transport)
    out = out or sys.stdout
    targets = [n for n in inventory.nodes if node is None or n.name == node]
    args = f"logs --node {{node}}{'' if rank is None else f' --rank {rank}'}" + (
        "" if lines is None else f" --lines {lines}") + (" --follow" if follow else "")
    lock = threading.Lock()
    problems: dict[str, str] = {}

    def one(n):
        proc = resolve_transport(transport, inventory, n).popen(
            n, _job_python(n, name, args.format(node=_q(n.name))))
        try:
            for raw in proc.stdout:
                with lock:
                    try:
                        out.write(raw if raw.endswith("\n") else raw + "\n")
                        out.flush()
                    except (BrokenPipeError, OSError):
                        proc.kill()
                        break
        finally:
            proc.wait()
        if proc.returncode == 3:
            problems[n.name] = f"no job {name}"
        elif proc.returncode not in (0, -9):
            problems[n.name] = f"exit {proc.returncode}"

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in targets]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        return 130  # the clients have sessions of their own; they end with their pipes
    if len(problems) == len(targets) and all(v.startswith("no job") for v in
                                             problems.values()):
        raise InputError(f"no job named {name!r} on "
                         f"{node or 'any node'}", field="NAME",
                         hint="dsk-provision jobs list -i INVENTORY")
    bad = {k: v for k, v in problems.items() if not v.startswith("no job")}
    for k, v in sorted(bad.items()):
        out.write(f"[{k}] could not read the logs ({v})\n")
    return 1 if bad else 0


__all__ = [
    "JobStatus", "NodeView", "StopResult", "check_name", "combine", "default_name",
    "job_dir", "job_status", "list_jobs", "print_logs", "stop_job",
]
