"""How a job's ranks survive failures: the restart rule and the watch on the other nodes.

Both apply to a named job (``DSK_JOB_DIR`` set, trainer/jobstate.py) and read its
``job.json``: ``max_restarts`` (``train --max-restarts``), ``min_nodes`` (``--min-nodes``)
and ``rendezvous_node``.

**Restarts since the last checkpoint.** torchrun restarts every rank of the job when one
dies; its own count never goes down, so the launcher gives it a budget large enough for
the whole run and the trainer applies the rule: at most ``max_restarts`` restarts
*between two checkpoints*. Each node keeps a ledger, ``attempts-<node>.json`` in the job
directory: the launch, how many times the trainer has started in it (attempts), and the
attempt in which the newest checkpoint was written. At start the ranks agree on the
largest of the nodes' counts (an attempt that died before one node counted it is still
counted by the others); a start with more than ``max_restarts`` restarts since the
checkpoint gives up: it writes ``abort.json`` (the reason) and waits for the node's
supervisor (trainer/job.py), which ends torchrun on its node and records the job failed.

**A node that dies.** Local rank 0 of each node bumps the node's heartbeat in the ranks'
store (on rank 0's node) every ``heartbeat_s`` and watches the others'. A node whose
heartbeat stands still for ``lost_after_s`` is lost; so is rank 0's node when a round of
store calls does not come back that long (the calls run in a thread of their own, since
a store whose host is gone leaves them hanging). A store that refuses connections is not
a lost node (its host answers; rank 0's process has ended): after two heartbeats the
rank exits and torchrun restarts or ends the job as for any rank that dies. With
restarts left, at least ``min_nodes`` nodes remaining, and the lost node not the
rendezvous node (its torchrun holds the rendezvous), the rank exits so that torchrun
restarts the job; its rendezvous (``--nnodes MIN:MAX``) goes on without the lost node and
the job resumes from the newest complete checkpoint. Otherwise the rank writes
``abort.json`` naming the node, and the supervisors end the job everywhere.

The two times come from ``DSK_NODE_WATCH`` (``HEARTBEAT_S:LOST_AFTER_S``, default
``5:30``; :func:`watch_timing`, the one place that reads it), which the launcher also
turns into torchrun's rendezvous keep-alives (dsk_provision/joblaunch.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NODE_VAR = "DSK_NODE"            # set by the node's supervisor (trainer/job.py)
ABORT_FILE = "abort.json"        # trainer.job reads it
# "HEARTBEAT_S:LOST_AFTER_S": how often each node's heartbeat is bumped, and how long one
# that stands still (or a store that does not answer) takes to make its node lost.
WATCH_VAR = "DSK_NODE_WATCH"
HEARTBEAT_S = 5.0
LOST_AFTER_S = 30.0
# Test drills only: pause local rank 0 of the node named here inside the save of step S,
# after the shards are written and before COMPLETE, for this many seconds;
SAVE_PAUSE_VAR = "DSK_DRILL_SAVE_PAUSE"   # "<node>:<step>:<seconds>"
# and end rank 0 abruptly before step S of attempt A, for each pair.
CRASH_VAR = "DSK_DRILL_CRASH"             # "A:S,A:S,..."


@dataclass
class Policy:
    launch: str
    max_restarts: int
    min_nodes: int | None
    rendezvous_node: str | None


def watch_timing(value: str | None = None) -> tuple[float, float]:
    """``(heartbeat_s, lost_after_s)`` from ``value`` (default: ``$DSK_NODE_WATCH``; unset
    or empty: ``HEARTBEAT_S:LOST_AFTER_S``). Raises ValueError saying what is expected."""
    if value is None:
        value = os.environ.get(WATCH_VAR, "")
    if not value.strip():
        return HEARTBEAT_S, LOST_AFTER_S
    expected = (f"{WATCH_VAR} must be HEARTBEAT_S:LOST_AFTER_S in seconds, the heartbeat at "
                f"least 1 and the lost-after time at least twice the heartbeat (default "
                f"{HEARTBEAT_S:g}:{LOST_AFTER_S:g}), not {value!r}")
    try:
        heartbeat_s, lost_after_s = (float(v) for v in value.split(":"))
    except ValueError:
        raise ValueError(expected) from None
    if not (1 <= heartbeat_s < float("inf") and 2 * heartbeat_s <= lost_after_s < float("inf")):
        raise ValueError(expected)
    return heartbeat_s, lost_after_s


def _job_dir() -> Path | None:
    value = os.environ.get("DSK_JOB_DIR")
    return Path(value) if value else None


def node_name() -> str:
    return os.environ.get(NODE_VAR) or os.uname().nodename


def policy() -> Policy | None:
    """The job's restart policy from job.json; None outside a named job."""
    base = _job_dir()
    if base is None:
        return None
    try:
        job = json.loads((base / "job.json").read_text())
    except (OSError, ValueError):
        return None
    min_nodes = job.get("min_nodes")
    return Policy(str(job.get("launch", "")), int(job.get("max_restarts") or 0),
                  int(min_nodes) if min_nodes else None, job.get("rendezvous_node"))


# --------------------------------------------------------------------------- the ledger


def _ledger_path(base: Path) -> Path:
    return base / f"attempts-{node_name()}.json"


def _read_ledger(base: Path, launch: str) -> dict:
    try:
        data = json.loads(_ledger_path(base).read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("launch") != launch:
        data = {"launch": launch, "attempts": 0, "checkpoint_attempt": 1}
    return data


def _write_ledger(base: Path, data: dict) -> None:
    path = _ledger_path(base)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def begin_attempt() -> dict | None:
    """Count this start in the node's ledger (local rank 0 only); returns the ledger."""
    base, pol = _job_dir(), policy()
    if base is None or pol is None:
        return None
    data = _read_ledger(base, pol.launch)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        data["attempts"] += 1
        _write_ledger(base, data)
    return data


def checkpoint_written(attempt: int, step: int) -> None:
    """Record, on this node, that a checkpoint was written in ``attempt``: the restart
    count starts again from there."""
    base, pol = _job_dir(), policy()
    if base is None or pol is None or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    data = _read_ledger(base, pol.launch)
    data.update(checkpoint_attempt=attempt, checkpoint_step=step)
    _write_ledger(base, data)


def restarts_since_checkpoint(attempt: int, checkpoint_attempt: int) -> int:
    """Attempt 1 is the launch; a checkpoint written in attempt c resets the count there."""
    return max(0, attempt - max(1, checkpoint_attempt))


def give_up(restarts: int, max_restarts: int) -> bool:
    return restarts > max_restarts


@dataclass
class Attempt:
    number: int                 # 1 for the launch, +1 per restart
    checkpoint_attempt: int     # the attempt that wrote the newest checkpoint (1 if none)
    restarts: int               # restarts since that checkpoint
    policy: Policy


def agree_attempt(ledger: dict | None, device) -> Attempt | None:
    """Every rank's view of the attempt: the largest count among the nodes (collective)."""
    pol = policy()
    if ledger is None or pol is None:
        return None
    import torch
    import torch.distributed as dist

    box = torch.tensor([ledger["attempts"], ledger["checkpoint_attempt"]],
                       dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    number, ckpt = int(box[0].item()), int(box[1].item())
    return Attempt(number, ckpt, restarts_since_checkpoint(number, ckpt), pol)


def abort(reason: str, **extra) -> None:
    """Ask this node's supervisor to end the job as failed (``reason`` in its record),
    and wait for it: exiting instead would make torchrun start the ranks again."""
    base, pol = _job_dir(), policy()
    print(f"giving up: {reason}", flush=True)
    if base is None or pol is None:
        os._exit(1)
    path = base / ABORT_FILE
    tmp = path.with_name(f".{ABORT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"launch": pol.launch, "reason": reason, "time": time.time(),
                               "node": node_name(), **extra}) + "\n")
    os.replace(tmp, path)
    time.sleep(120)  # the supervisor ends this process long before
    os._exit(1)


# --------------------------------------------------------------------------- drills


def drill_save_pause(step: int) -> None:
    """The pause of ``DSK_DRILL_SAVE_PAUSE`` (tests only: a rank killed mid-save)."""
    value = os.environ.get(SAVE_PAUSE_VAR, "")
    if value.count(":") != 2:
        return
    node, at, seconds = value.split(":")
    if (node == node_name() and at == str(step)
            and int(os.environ.get("LOCAL_RANK", "0")) == 0):
        print(f"drill: pausing {seconds} s inside the save of step {step}", flush=True)
        time.sleep(float(seconds))


def drill_crash(attempt: Attempt | None, step: int) -> None:
    """The crashes of ``DSK_DRILL_CRASH`` (tests only: failures at chosen moments)."""
    value = os.environ.get(CRASH_VAR)
    if not value or attempt is None or os.environ.get("RANK", "0") != "0":
        return
    if f"{attempt.number}:{step}" in value.split(","):
        print(f"drill: rank 0 ends abruptly before step {step} (attempt {attempt.number})",
              flush=True)
        os._exit(9)


# --------------------------------------------------------------------------- the watch


class _Call:
    """A function run in a daemon thread of its own: a store call to a host that is gone
    may never return, and the watch must not wait with it."""

    def __init__(self, fn, *args):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args),
                                       name="dsk-node-watch-store", daemon=True)
        self.thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self.result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the caller decides what it means
            self.error = exc


class NodeWatch:
    """Heartbeats between the nodes through the ranks' store (local rank 0 of each node).

    ``start`` needs the process group (it gathers the nodes' names); the watch runs in a
    daemon thread and, when a node is lost, either exits this process (the job may go on
    without it: torchrun restarts) or aborts the job naming the node.
    """

    def __init__(self, attempt: Attempt, nodes: list[str], prefix: str, store_node: str,
                 heartbeat_s: float | None = None, lost_after_s: float | None = None):
        self.attempt = attempt
        self.me = node_name()
        self.nodes = nodes
        self.store_node = store_node  # rank 0's node: it holds the ranks' store
        self.prefix = prefix
        default_heartbeat, default_lost = watch_timing()
        self.heartbeat_s = heartbeat_s or default_heartbeat
        self.lost_after_s = lost_after_s or default_lost
        self.thread: threading.Thread | None = None
        self.done = threading.Event()

    def stop(self) -> None:
        """The job has ended on this node: nodes that end before it are not lost."""
        self.done.set()

    @classmethod
    def start(cls, attempt: Attempt | None) -> NodeWatch | None:
        import uuid

        import torch.distributed as dist

        if attempt is None:
            return None
        watch_timing()  # a bad DSK_NODE_WATCH fails every rank at once, saying why
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, node_name())
        nodes = sorted(set(names))
        box = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if len(nodes) < 2 or int(os.environ.get("LOCAL_RANK", "0")) != 0:
            return None
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        watch = cls(attempt, nodes, f"dsk/heartbeat/{box[0]}/", names[0])
        watch.thread = threading.Thread(target=watch._run, name="dsk-node-watch",
                                        daemon=True)
        watch.thread.start()
        return watch

    def _store(self):
        from datetime import timedelta

        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=self.heartbeat_s * 2),
                             wait_for_workers=False)

    def _round(self, held: list) -> dict[str, int]:
        """One round of store calls (in a thread of its own): this node's heartbeat up by
        one, the other nodes' counts read."""
        if held[0] is None:
            held[0] = self._store()
        store = held[0]
        store.add(self.prefix + self.me, 1)
        return {n: store.add(self.prefix + n, 0) for n in self.nodes if n != self.me}

    def _refused(self) -> bool:
        """The store's port refuses connections: its host answers, its process is gone."""
        import socket

        try:
            with socket.create_connection((os.environ["MASTER_ADDR"],
                                           int(os.environ["MASTER_PORT"])),
                                          timeout=self.heartbeat_s):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    def _run(self) -> None:
        held: list = [None]
        seen: dict[str, tuple[int, float]] = {}
        answered = time.monotonic()   # the last round the store's host answered
        ended_since = None            # since when the store refuses connections
        call: _Call | None = None
        while not self.done.is_set():
            began = time.monotonic()
            if call is None:
                call = _Call(self._round, held)
            call.thread.join(self.heartbeat_s)
            now = time.monotonic()
            if self.done.is_set():
                return
            if not call.thread.is_alive():
                finished, call = call, None
                if finished.error is None:
                    answered, ended_since = now, None
                    for node, count in finished.result.items():
                        last = seen.get(node)
                        if last is None or count != last[0]:
                            seen[node] = (count, now)
                        elif now - last[1] > self.lost_after_s:
                            self.lost(node, now - last[1])
                            return
                else:
                    held[0] = None
                    if self._refused():
                        answered = now
                        ended_since = ended_since or now
            if now - answered > self.lost_after_s:
                self.lost(self.store_node, now - answered, store_host=True)
                return
            if ended_since is not None and now - ended_since >= 2 * self.heartbeat_s:
                self.store_ended(now - ended_since)
                return
            if call is None:
                self.done.wait(max(0.0, self.heartbeat_s - (time.monotonic() - began)))

    def store_ended(self, for_s: float) -> None:
        """Rank 0's process is gone, its node is not (it refuses connections): this
        attempt cannot go on. torchrun restarts the job, or ends it, as for any rank that
        dies (it may already be doing so, waiting for this rank to reach a step)."""
        print(f"the ranks' store on {self.store_node} has refused connections for "
              f"{for_s:.0f} s (rank 0 has ended): ending this rank", flush=True)
        os._exit(1)

    def lost(self, node: str, silent_s: float, store_host: bool = False) -> None:
        pol = self.attempt.policy
        remaining = len(self.nodes) - 1
        restarts_left = pol.max_restarts - self.attempt.restarts
        silent = "the ranks' store there silent" if store_host else "no heartbeat"
        what = f"node {node} stopped answering ({silent} for {silent_s:.0f} s)"
        rendezvous = node == pol.rendezvous_node
        if (not rendezvous and pol.min_nodes is not None and remaining >= pol.min_nodes
                and restarts_left > 0):
            print(f"{what}: going on with the {remaining} other nodes (--min-nodes "
                  f"{pol.min_nodes}); restarting from the newest complete checkpoint",
                  flush=True)
            os._exit(1)
        if rendezvous:
            why = ("it held the job's rendezvous (the first node in service): the job "
                   "cannot go on without it, even with --min-nodes; once it is cordoned "
                   "or replaced, the next launch rendezvouses on another node")
        elif restarts_left <= 0:
            why = ("no restart left" if pol.max_restarts else "restarts are off "
                   "(--max-restarts 0)")
        elif pol.min_nodes is None:
            why = "the job does not go on with fewer nodes (no --min-nodes)"
        else:
            why = f"{remaining} nodes left, fewer than --min-nodes {pol.min_nodes}"
        abort(f"{what}; {why}", lost_node=node)
