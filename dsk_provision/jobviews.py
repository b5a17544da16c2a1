"""What the jobs commands say of a job, whichever launcher started it: each node's view
(``NodeView``), the job's state (``JobStatus``) and what a stop did (``StopResult``).
The probe they are made from, one command on many nodes at once, is
dsk_provision.remote.on_nodes.

dsk_provision.jobs fills them for jobs of the SSH launcher, dsk_provision.slurmjobs for
jobs of the slurm launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A probe of one node (status, list): long enough for a busy node, short enough that a
# dead one does not hold up the answer.
PROBE_TIMEOUT_S = 20.0


@dataclass
class NodeView:
    node: str
    reachable: bool
    exists: bool = False
    running: bool = False
    state: str | None = None           # the supervisor's record: running/finished/failed/stopped
    exit_code: int | None = None
    ended: float | None = None
    launch: str | None = None
    processes: int = 0
    stop_requested: bool = False
    trainer: dict | None = None        # rank 0's status.json, on the node that holds it
    checkpoint: dict | None = None
    job: dict = field(default_factory=dict)
    error: str | None = None
    reason: str | None = None          # why the job ended here, when a rank said (abort)
    lost_node: str | None = None       # the node the ranks here lost


@dataclass
class JobStatus:
    name: str
    state: str                          # running, stopping, finished, failed, stopped, unknown
    nodes: list[NodeView]
    trainer: dict | None
    checkpoint: dict | None
    culprit: str | None = None          # the failed node, and rank when known
    culprit_node: str | None = None
    slurm: dict | None = None           # a Slurm job's id, state, reason, nodes (slurmjobs)

    def to_dict(self) -> dict:
        out = {"name": self.name, "state": self.state, "culprit": self.culprit,
               "trainer": self.trainer, "checkpoint": self.checkpoint,
               "nodes": [vars(n) for n in self.nodes]}
        if self.slurm is not None:
            out["slurm"] = self.slurm
        return out


@dataclass
class StopResult:
    name: str
    stopped: list[str]          # nodes where something of the job was running
    escalated: dict[str, str]   # node -> TERM / KILL
    left: dict[str, list[int]]  # node -> PIDs still alive (should be empty)
    unreachable: list[str]
    checkpoint: dict | None


__all__ = ["PROBE_TIMEOUT_S", "JobStatus", "NodeView", "StopResult"]
