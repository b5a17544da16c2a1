"""Slurm's controller as the launcher and the jobs commands reach it: which node runs
slurmctld (``dsk_slurm_controller``), a job's state as ``scontrol show job`` reports it,
``scancel``, and the shell loop that follows a job's output until Slurm says it ended.

dsk_provision.slurm submits jobs through it; dsk_provision.slurmjobs reads and stops them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from dsk_provision import defaults
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.remote import TransportChoice, resolve_transport, run_command

# Slurm's job states (squeue/scontrol/sacct spelling) -> the jobs commands' states.
STATES = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending",
    "CONFIGURING": "running", "RUNNING": "running", "RESIZING": "running",
    "SUSPENDED": "running",
    "COMPLETING": "stopping", "SIGNALING": "stopping", "STAGE_OUT": "stopping",
    "STOPPED": "stopping",
    "COMPLETED": "finished",
    "CANCELLED": "stopped",
    "FAILED": "failed", "NODE_FAIL": "failed", "TIMEOUT": "failed",
    "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed",
    "PREEMPTED": "failed", "SPECIAL_EXIT": "failed", "REVOKED": "failed",
}
# The jobs commands' states of a job still under way, and the Slurm states they stand for.
UNDER_WAY = ("pending", "running", "stopping")
ACTIVE_STATES = frozenset(state for state, name in STATES.items() if name in UNDER_WAY)
# Seconds between two looks at a job's state.
POLL_S = 2.0


def enabled(inventory) -> bool:
    """Whether the cluster runs Slurm (dsk_slurm_enabled)."""
    return bool(defaults.resolve("dsk_slurm_enabled", inventory.vars or {}))


def controller(inventory):
    """The node that runs slurmctld, where jobs are submitted (dsk_slurm_controller)."""
    values = inventory.vars or {}
    if not enabled(inventory):
        raise InputError("the slurm launcher needs Slurm on the cluster",
                         file=str(getattr(inventory, "path", "") or "") or None,
                         field="dsk_slurm_enabled",
                         hint="set dsk_slurm_enabled: true and run bootstrap, or use "
                              "--launcher ssh")
    name = str(defaults.resolve("dsk_slurm_controller", values) or "")
    if not name:
        return inventory.nodes[0]
    for node in inventory.nodes:
        if node.name == name:
            return node
    raise InputError(f"dsk_slurm_controller names {name!r}, which is not a node in service",
                     field="dsk_slurm_controller")


@dataclass
class JobState:
    job_id: str
    state: str            # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED ...
    exit_code: str        # "0:0": exit code and signal of the batch script
    reason: str
    batch_host: str
    nodes: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def parse_job(text: str) -> JobState | None:
    """`scontrol show job -o ID` -> JobState; None when Slurm no longer knows the job."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
    if "JobId" not in fields or "JobState" not in fields:
        return None
    return JobState(job_id=fields["JobId"], state=fields["JobState"],
                    exit_code=fields.get("ExitCode", ""), reason=fields.get("Reason", ""),
                    batch_host=fields.get("BatchHost", ""),
                    nodes=fields.get("NodeList", ""))


def job_state(inventory, job_id: str, *, transport: TransportChoice = None) -> JobState | None:
    node = controller(inventory)
    rc, out = run_command(resolve_transport(transport, inventory, node), node,
                          f"scontrol show job -o {shlex.quote(job_id)}", timeout=60)
    if rc != 0 and "Invalid job id" in out:
        return None
    if rc != 0:
        raise RunFailed(f"scontrol on {node.name} failed (exit {rc}): {out.strip()[-500:]}",
                        nodes=[node.name])
    return parse_job(out)


def cancel(inventory, job_id: str, *, transport: TransportChoice = None) -> None:
    """scancel the job on the controller; Slurm signals and kills every step on every node."""
    node = controller(inventory)
    run_command(resolve_transport(transport, inventory, node), node,
                f"scancel {shlex.quote(job_id)}", timeout=60)


def follow_command(log_path: PurePosixPath, job_id: str) -> str:
    """Runs on the job's first node: the job's output as it grows, until the job ends."""
    q = shlex.quote
    active = "|".join(sorted(ACTIVE_STATES))
    return (f"tail -n +1 -F {q(str(log_path))} 2>/dev/null & t=$!; "
            f"while scontrol show job -o {q(job_id)} 2>/dev/null "
            f"| grep -qE 'JobState=({active}) '; do sleep {POLL_S:g}; done; "
            "sleep 1; kill $t; wait $t 2>/dev/null; exit 0")


__all__ = ["ACTIVE_STATES", "POLL_S", "STATES", "UNDER_WAY", "JobState", "cancel", "controller",
           "enabled", "follow_command", "job_state", "parse_job"]
