"""`train`: start a named job on every node, follow it (the live view, fail fast, Ctrl-C),
then fetch its metrics and check the loss.

``start_job`` ships the trainer, the config and ``job.json`` into the job's directory on
every node and starts one supervisor per node (trainer/job.py) in a session of its own:

    cd {dsk_root}/jobs/<name> && setsid -f env <vars> {dsk_python} -m trainer.job run
        --node <node> --launch <id> -- {dsk_python} -m torch.distributed.run --nnodes N
        (MIN:N with --min-nodes) --nproc_per_node P --rdzv_backend c10d
        --rdzv_endpoint <first node>:<port> --rdzv_conf is_host=<1 on the first node,
        else 0>,keep_alive_interval=H,last_call_timeout=L --rdzv_id <name>
        --max-restarts R' -m trainer.train --config config/<file> --out out --checkpoint-dir <dir>
        >> logs/node-<node>.log 2>&1 < /dev/null

where R' is torchrun's budget for ``--max-restarts R`` restarts between two checkpoints
(:func:`torchrun_restarts`; trainer/resilience.py applies the rule itself), and H and L
the node watch's heartbeat and lost-after times (``DSK_NODE_WATCH``, :func:`rdzv_conf`),
and returns once every node has recorded the launch. ``follow_job`` reads the job's
logs from every node (``trainer.job logs --follow``, one SSH session per node), shows
them (:class:`LiveView`), keeps every line in the local run directory, stops the job on
every node when one node fails, and says how the job ended. ``train`` does both under the
cluster's lock, then reads rank 0's metrics back from the node that holds them.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dsk_provision.errors import InputError, Interrupted, RunFailed
from dsk_provision.files import make_private_dir, open_private
from dsk_provision.interrupts import InterruptGuard
from dsk_provision.jobs import (
    JOB_DIR_VAR,
    JOB_MARKER_VAR,
    LINE_RE,
    STOP_GRACE_S,
    _job_python,
    _q,
    check_name,
    default_name,
    job_dir,
    job_status,
    list_jobs,
    stop_job,
)
from dsk_provision.jobviews import PROBE_TIMEOUT_S
from dsk_provision.launch import (
    TrainResult,
    checked_losses,
    fetch_results,
    harmless,
    is_victim,
    node_env,
    nproc_for,
    rendezvous_endpoint,
    ship_to,
)
from dsk_provision.lock import holds_cluster_lock
from dsk_provision.remote import TransportChoice, on_nodes, resolve_transport

# How long the nodes get to record a launch before it counts as failed to start.
START_TIMEOUT_S = 60.0
MODULE = "trainer.train"

STEP_RE = re.compile(r"^step (?P<step>\d+)/(?P<total>\d+) \| loss (?P<loss>\S+) \| "
                     r"tok/s (?P<tps>[\d,.]+) \| mfu (?P<mfu>\S+)")
_ERROR_RE = re.compile(r"Traceback|Error|error:|failed|Killed|exited with code")


# --------------------------------------------------------------------------- start


def torchrun_restarts(max_restarts: int, cfg) -> int:
    """torchrun's own budget: enough for ``max_restarts`` between every two checkpoints
    of the run (trainer/resilience.py applies the rule; torchrun's count never resets)."""
    if max_restarts == 0 or not cfg.checkpoint.interval:
        return max_restarts
    return max_restarts * (cfg.training.steps // cfg.checkpoint.interval + 2)


def rdzv_conf(inventory, node, env: dict | None = None) -> str:
    """torchrun's ``--rdzv_conf`` for a node. The first node hosts the rendezvous and the
    others never do (on one machine, local nodes would otherwise race for the port). Its
    keep-alives follow the node watch (``DSK_NODE_WATCH`` in ``env``, as the ranks get
    it): a node is dropped from the rendezvous after three silent heartbeats, and once
    ``--min-nodes`` have joined, the others get the lost-after time to join too (5:30, the
    default, gives torch's own defaults, 5 s and 30 s)."""
    from trainer.resilience import WATCH_VAR, watch_timing

    heartbeat_s, lost_after_s = watch_timing((env or {}).get(WATCH_VAR, ""))
    host = 1 if node.name == inventory.nodes[0].name else 0
    return (f"is_host={host},keep_alive_interval={math.ceil(heartbeat_s)},"
            f"last_call_timeout={math.ceil(lost_after_s)}")


def torchrun_argv(inventory, node, name: str, config_rel: str, *, nproc: int,
                  max_restarts: int, min_nodes: int | None = None,
                  env: dict | None = None) -> list[str]:
    """``max_restarts``: torchrun's budget (torchrun_restarts); ``min_nodes``: the
    rendezvous goes on with that many nodes when others are lost; ``env``: the ranks'
    extra environment (its ``DSK_NODE_WATCH``, for :func:`rdzv_conf`)."""
    count = len(inventory.nodes)
    return [
        node.settings.python, "-m", "torch.distributed.run",
        "--nnodes", f"{min_nodes}:{count}" if min_nodes and min_nodes < count else str(count),
        "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", rendezvous_endpoint(inventory),
        "--rdzv_conf", rdzv_conf(inventory, node, env),
        "--rdzv_id", name,
        "--max-restarts", str(max_restarts),
        "-m", MODULE, "--config", config_rel, "--out", "out",
        "--checkpoint-dir", str(node.settings.checkpoint_dir(name)),
    ]


def start_command(inventory, node, name: str, config_rel: str, launch: str, *, nproc: int,
                  max_restarts: int, env: dict | None = None,
                  container: str | None = None, min_nodes: int | None = None) -> str:
    """The shell line that starts the job's supervisor on a node and returns at once.
    With ``container`` (an image), the supervisor runs torchrun in it through the node's
    container runtime (dsk_provision.containers), with the same environment."""
    d = job_dir(node, name)
    variables = node_env(node, env, remote_dir=d)
    variables[JOB_MARKER_VAR] = name
    variables[JOB_DIR_VAR] = str(d)
    if min_nodes:
        # Membership can change between rounds: each round's rank 0 hosts a fresh store
        # for the ranks (a store kept from an earlier round may be on the lost node).
        variables["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    argv = torchrun_argv(inventory, node, name, config_rel, nproc=nproc,
                         max_restarts=max_restarts, min_nodes=min_nodes, env=env)
    prepare = ""
    if container:
        from dsk_provision import containers

        ckpt = node.settings.checkpoint_dir(name)
        cname = containers.container_name(name)
        argv = containers.run_argv(node, container, argv, name=cname, workdir=d,
                                   binds=[d, ckpt], env=variables)
        # The runtime binds only what exists; a container left by a killed launch goes.
        prepare = f"mkdir -p {_q(ckpt)} && {containers.remove_command(node, cname)} && "
    supervisor = [node.settings.python, "-m", "trainer.job", "run", "--node", node.name,
                  "--launch", launch, "--", *argv]
    # The previous launch's logs are kept beside the new ones (logs.prev).
    return (f"cd {_q(d)} && rm -f stop-requested && "
            "{ [ ! -d logs ] || { rm -rf logs.prev && mv logs logs.prev; }; } && "
            f"mkdir -p logs out && {prepare}"
            f"setsid -f env {' '.join(f'{k}={_q(v)}' for k, v in variables.items())} "
            f"{' '.join(_q(a) for a in supervisor)} "
            f">> {_q(f'logs/node-{node.name}.log')} 2>&1 < /dev/null")


def fresh_command(node, name: str) -> str:
    d = job_dir(node, name)
    ckpt = node.settings.checkpoint_dir(name)
    return (f"cd {_q(d)} 2>/dev/null || exit 0; "
            f"rm -rf out logs logs.prev stop-requested abort.json node-*.json "
            f"attempts-*.json {_q(ckpt)}")


def _watch_env(env: dict | None) -> dict:
    """The ranks' extra environment with ``DSK_NODE_WATCH`` (given, or this process's),
    checked before any connection."""
    from trainer.resilience import WATCH_VAR, watch_timing

    env = dict(env or {})
    if WATCH_VAR not in env and os.environ.get(WATCH_VAR):
        env[WATCH_VAR] = os.environ[WATCH_VAR]
    try:
        watch_timing(str(env.get(WATCH_VAR) or ""))
    except ValueError as exc:
        raise InputError(str(exc), field=WATCH_VAR) from None
    return env


@dataclass
class StartedJob:
    name: str
    launch: str
    nodes: list[str]
    world_size: int
    dirs: dict[str, str]
    resumed_from: int | None


def _check_free(inventory, name: str, transport) -> int | None:
    """Refuse when a job runs on the cluster (this one or another: they would share the
    rendezvous port); returns this job's newest complete checkpoint step, if any."""
    jobs, silent = list_jobs(inventory, transport=transport)
    if silent:
        raise RunFailed(f"{', '.join(silent)} did not answer; nothing was started",
                        nodes=silent, hint="check that the nodes are up, or cordon the "
                        "dead one: dsk-provision nodes cordon -i INVENTORY NODE --reason ...")
    for job in jobs:
        if job.state in ("running", "stopping"):
            where = ", ".join(v.node for v in job.nodes if v.running)
            if job.name == name:
                raise RunFailed(f"job {name} is already {job.state} on {where}",
                                hint=f"follow it: dsk-provision jobs logs -i INVENTORY {name} "
                                     f"--follow; stop it: dsk-provision jobs stop -i "
                                     f"INVENTORY {name}")
            raise RunFailed(f"job {job.name} is {job.state} on {where}: one job at a time "
                            "(they would share the rendezvous port)",
                            hint=f"dsk-provision jobs stop -i INVENTORY {job.name}")
    mine = next((j for j in jobs if j.name == name), None)
    return mine.checkpoint["step"] if mine and mine.checkpoint else None


def start_job(inventory, config_path: Path, name: str, *, fresh: bool = False,
              max_restarts: int = 0, nproc_per_node: int | None = None,
              env: dict | None = None, transport: TransportChoice = None,
              container: str | None = None, min_nodes: int | None = None,
              say=lambda _text: None) -> StartedJob:
    """Ship and start the job on every node; returns once each has recorded the launch.
    A job of the same name continues from its newest complete checkpoint (``fresh``:
    its outputs and checkpoints are removed first). ``max_restarts``: restarts allowed
    between two checkpoints; ``min_nodes``: with restarts, the job goes on without a
    lost node while at least this many remain (trainer/resilience.py). ``container``: an
    image that torchrun runs in on every node (dsk_provision.containers)."""
    from dsk_provision import preflight
    from trainer.config import check_world_size, load_config

    check_name(name)
    if container:
        from dsk_provision import containers

        container = containers.check_image(container)
        for node in inventory.nodes:
            # A node without a runtime or with a bad RDMA setting, before any connection.
            containers.check_node(node, str(inventory.path))
    if max_restarts < 0:
        raise InputError("must be 0 or more", field="--max-restarts")
    if min_nodes is not None and not 1 <= min_nodes <= len(inventory.nodes):
        raise InputError(f"must be between 1 and the {len(inventory.nodes)} nodes in "
                         "service", field="--min-nodes")
    if min_nodes is not None and max_restarts == 0:
        raise InputError("going on with fewer nodes is a restart: give --max-restarts too",
                         field="--min-nodes")
    env = _watch_env(env)
    config_path = Path(config_path)
    cfg = load_config(config_path)
    world_size = sum(nproc_for(n, nproc_per_node) for n in inventory.nodes)
    check_world_size(cfg, world_size)
    preflight.check_memory(inventory, cfg, world_size, say=say)  # before any connection
    resumed_from = _check_free(inventory, name, transport)
    if fresh:
        results = on_nodes(inventory, inventory.nodes, lambda n: fresh_command(n, name),
                           timeout=PROBE_TIMEOUT_S * 3, transport=transport)
        bad = [n for n, (rc, _out) in results.items() if rc != 0]
        if bad:
            raise RunFailed(f"could not remove job {name}'s outputs on {', '.join(bad)}",
                            nodes=bad)
        resumed_from = None
    # Each node: the rendezvous address resolves and answers, the trainer's modules import.
    preflight.before_launch(inventory, cfg, {n.name: nproc_for(n, nproc_per_node)
                                             for n in inventory.nodes},
                            transport=transport, container=container, say=say)
    launch = uuid.uuid4().hex[:12]
    config_rel = f"config/{config_path.name}"
    first = inventory.nodes[0]
    record = {"name": name, "config": config_rel, "config_source": str(config_path),
              "nodes": [n.name for n in inventory.nodes], "world_size": world_size,
              "max_restarts": max_restarts, "min_nodes": min_nodes,
              "rendezvous_node": first.name, "launch": launch, "launched": time.time(),
              "checkpoint_dir": str(first.settings.checkpoint_dir(name)),
              "container": container}
    with tempfile.TemporaryDirectory(prefix="dsk-job-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(record, indent=1) + "\n")
        ship_to(inventory, lambda node: job_dir(node, name),
                {config_rel: config_path, "job.json": job_file}, transport=transport)
    say(f"job {name}: {len(inventory.nodes)} nodes, world size {world_size}, config "
        f"{config_path}" + (f", in image {container}" if container else "")
        + (f", continuing from step {resumed_from}" if resumed_from is not None else ""))
    started = on_nodes(
        inventory, inventory.nodes,
        lambda n: start_command(inventory, n, name, config_rel, launch,
                                nproc=nproc_for(n, nproc_per_node),
                                max_restarts=torchrun_restarts(max_restarts, cfg), env=env,
                                container=container, min_nodes=min_nodes),
        timeout=PROBE_TIMEOUT_S * 3, transport=transport)
    bad = {n: out for n, (rc, out) in started.items() if rc != 0}
    if bad:
        stop_job(inventory, name, grace_s=5, transport=transport)
        raise RunFailed("could not start the job on " + "; ".join(
            f"{n}: {(o.strip().splitlines() or ['?'])[-1]}" for n, o in sorted(bad.items())),
            nodes=sorted(bad))
    # Every supervisor records the launch first thing; wait for all of them.
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = job_status(inventory, name, transport=transport, blame=False)
        waiting = [v.node for v in status.nodes if v.launch != launch]
        if not waiting:
            break
        if time.monotonic() > deadline:
            stop_job(inventory, name, grace_s=5, transport=transport)
            raise RunFailed(f"job {name} did not start on {', '.join(waiting)} within "
                            f"{START_TIMEOUT_S:g} s", nodes=waiting,
                            hint=f"see {job_dir(inventory.node(waiting[0]), name)}/logs on "
                                 f"{waiting[0]}")
        time.sleep(0.5)
    return StartedJob(name, launch, [n.name for n in inventory.nodes], world_size,
                      {n.name: str(job_dir(n, name)) for n in inventory.nodes}, resumed_from)


# --------------------------------------------------------------------------- live view


class LiveView:
    """What the console shows while following a job.

    By default: rank 0's progress as one line (redrawn in place on a terminal, one line
    per step otherwise) with step, loss, tokens/s, MFU and ETA; rank 0's other lines,
    the nodes' supervisor and torchrun lines, and other ranks' errors. ``verbose``:
    every line of every rank. Known-harmless library warnings are left out unless
    verbose; every line is in the logs either way.
    """

    def __init__(self, out=None, *, verbose: bool = False, tty: bool | None = None):
        self.out = out or sys.stdout
        self.verbose = verbose
        self.tty = self.out.isatty() if tty is None else tty
        self.lock = threading.Lock()
        self.progress: str | None = None
        self.steps: list[tuple[float, int]] = []

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass  # the terminal is gone: the logs still get every line

    def say(self, text: str) -> None:
        with self.lock:
            if self.tty and self.progress:
                self._write("\r\x1b[2K")
            self._write(text + "\n")
            if self.tty and self.progress:
                self._write(self.progress)

    def progress_line(self, match: re.Match, now: float) -> str:
        step, total = int(match["step"]), int(match["total"])
        self.steps = (self.steps + [(now, step)])[-20:]
        eta = "-"
        if len(self.steps) >= 2 and self.steps[-1][1] > self.steps[0][1]:
            per_step = (self.steps[-1][0] - self.steps[0][0]) / (
                self.steps[-1][1] - self.steps[0][1])
            eta = _duration(per_step * (total - step))
        return (f"step {step}/{total} | loss {match['loss']} | tok/s {match['tps']} | "
                f"mfu {match['mfu']} | eta {eta}")

    def line(self, node: str, rank: str | None, text: str) -> None:
        label = f"[{node}{'' if rank is None else ' rank ' + rank}]"
        if self.verbose:
            self.say(f"{label} {text}")
            return
        if harmless(text):
            return
        if rank is None or rank == "0":
            match = STEP_RE.match(text) if rank == "0" else None
            if match and self.tty:
                with self.lock:
                    self.progress = f"{label} {self.progress_line(match, time.monotonic())}"
                    self._write("\r\x1b[2K" + self.progress)
                return
            if match:
                self.say(f"{label} {self.progress_line(match, time.monotonic())}")
                return
            self.say(f"{label} {text}")
        elif _ERROR_RE.search(text):
            self.say(f"{label} {text}")

    def close(self) -> None:
        with self.lock:
            if self.tty and self.progress:
                self._write("\n")
            self.progress = None


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# --------------------------------------------------------------------------- follow


@dataclass
class _Follower:
    node: str
    proc: subprocess.Popen
    log_path: Path
    reader: threading.Thread | None = None


def _read(follower: _Follower, view: LiveView, quiet: list[bool]) -> None:
    with open(follower.log_path, "a", buffering=1) as log:
        for raw in follower.proc.stdout:
            line = raw.rstrip("\n")
            log.write(line + "\n")
            if quiet[0]:
                continue
            match = LINE_RE.match(line)
            if match:
                view.line(match["node"], match["rank"], match["text"])
            elif line.strip():
                view.line(follower.node, None, line)


def _ask_stop() -> bool:
    """Ctrl-C at a terminal: stop the job, or only stop following it?"""
    try:
        answer = input("\nstop the job on every node [s], or stop following it and leave "
                       "it running [f]? [s/f] ").strip().lower()
    except (EOFError, OSError, KeyboardInterrupt):
        return True
    return not answer.startswith("f")


@dataclass
class FollowResult:
    state: str                 # finished, stopped, detached
    status: object | None      # the final JobStatus


def follow_job(inventory, name: str, *, run_dir: Path, view: LiveView,
               transport: TransportChoice = None, timeout_s: float | None = None,
               interactive: bool | None = None, inventory_hint: str = "INVENTORY",
               stop_grace_s: float = STOP_GRACE_S) -> FollowResult:
    """Follow the job until it ends on every node; stop it everywhere when one node
    fails (RunFailed names the node and rank) or on SIGINT/SIGTERM/SIGHUP (Interrupted;
    SIGINT at a terminal asks first, and may leave the job running)."""
    if interactive is None:
        interactive = sys.stdin.isatty()
    log_dir = make_private_dir(run_dir / "logs")
    followers: list[_Follower] = []
    quiet = [False]
    started = time.monotonic()
    with InterruptGuard() as guard:
        try:
            with guard.held():
                for node in inventory.nodes:
                    log_path = log_dir / f"{node.name}.log"
                    open_private(log_path, "a").close()
                    proc = resolve_transport(transport, inventory, node).popen(
                        node, _job_python(node, name, f"logs --node {_q(node.name)} "
                                                      "--follow"))
                    f = _Follower(node.name, proc, log_path)
                    f.reader = threading.Thread(target=_read, args=(f, view, quiet),
                                                daemon=True)
                    f.reader.start()
                    followers.append(f)
            outcome = _watch(inventory, name, followers, started, timeout_s, transport)
        except Interrupted as exc:
            with guard.held():
                view.close()
                if exc.signum == signal.SIGINT and interactive and not _ask_stop():
                    quiet[0] = True
                    _end_followers(followers)
                    view.say(f"left job {name} running; follow it again with: "
                             f"dsk-provision jobs logs -i {inventory_hint} {name} --follow")
                    return FollowResult("detached", None)
                quiet[0] = True
                view.say(f"{exc.signal_name}: stopping job {name} on "
                         f"{', '.join(n.name for n in inventory.nodes)} (a checkpoint "
                         f"first when it can; SIGKILL after {stop_grace_s:g} s)")
                result = stop_job(inventory, name, grace_s=stop_grace_s,
                                  transport=transport)
                _end_followers(followers)
            stopped = result.stopped or [n.name for n in inventory.nodes]
            raise Interrupted(exc.signum, f"interrupted by {exc.signal_name}; stopped "
                              f"{MODULE} on {', '.join(stopped)}",
                              hint=f"logs in {log_dir}; continue it with the same --name "
                                   f"{name}") from None
        with guard.held():
            if outcome[0] in ("failed", "timeout", "lost"):
                quiet[0] = True
                # A failed job's other ranks wait in collectives that will not finish:
                # no checkpoint to wait for (a timeout is stopped gracefully).
                grace = stop_grace_s if outcome[0] == "timeout" else 5
                result = stop_job(inventory, name, grace_s=grace, transport=transport)
            _end_followers(followers, wait_s=10)
    view.close()
    kind, status, culprit = outcome
    others = [n.name for n in inventory.nodes if n.name != (culprit or "")]
    if kind == "failed":
        who = status.culprit or culprit
        code = next((v.exit_code for v in status.nodes if v.node == culprit), None)
        stopped = [n for n in result.stopped if n != culprit] or others
        raise RunFailed(f"{MODULE} failed: {who} exited with code {code}; stopped "
                        f"{', '.join(stopped)}", nodes=[culprit],
                        hint=f"dsk-provision jobs logs -i {inventory_hint} {name} --node "
                             f"{culprit}; local copy in {log_dir / (culprit + '.log')}")
    if kind == "lost":
        raise RunFailed(f"{MODULE} failed: {culprit} stopped answering; stopped "
                        f"{', '.join(others)}", nodes=[culprit],
                        hint=f"if {culprit} is dead, take it out of service and continue "
                             f"the job on the others: dsk-provision nodes cordon -i "
                             f"{inventory_hint} {culprit} --reason ..., then train again "
                             f"with --name {name} (or replace the node)")
    if kind == "timeout":
        raise RunFailed(f"{MODULE} did not finish within {timeout_s:g} s; stopped "
                        f"{', '.join(result.stopped)}", nodes=result.stopped,
                        hint=f"logs in {log_dir}")
    return FollowResult(status.state, status)


def _end_followers(followers: list[_Follower], wait_s: float = 3.0) -> None:
    deadline = time.monotonic() + wait_s
    for f in followers:
        try:
            f.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            f.proc.kill()
            f.proc.wait()
        if f.reader:
            f.reader.join(timeout=5)


def _watch(inventory, name: str, followers: list[_Follower], started: float,
           timeout_s: float | None, transport) -> tuple[str, object, str | None]:
    """Until every node's follower has ended: ('finished'|'stopped', status, None), or
    the first failure: ('failed', status, node), ('lost', status, node), ('timeout',...)."""
    seen: set[str] = set()
    while True:
        ended = [f for f in followers if f.proc.poll() is not None and f.node not in seen]
        if ended:
            seen.update(f.node for f in ended)
            status = job_status(inventory, name, transport=transport)
            lost = [v.node for v in status.nodes if not v.reachable]
            lost = [v.lost_node for v in status.nodes if v.lost_node] or lost
            if lost:
                return "lost", status, lost[0]
            failed = [v for v in status.nodes if not v.running and v.state == "failed"]
            if failed and not any(v.stop_requested for v in status.nodes):
                time.sleep(1.0)  # let nodes that fail on their own say so
                status = job_status(inventory, name, transport=transport)
                failed = [v for v in status.nodes if not v.running and v.state == "failed"]
                first = _first_failure(inventory, name, failed, transport)
                status.culprit = _blame(inventory, name, first, transport)
                return "failed", status, first
            if len(seen) == len(followers):
                return status.state, status, None
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            return "timeout", None, None
        time.sleep(0.2)


def _first_failure(inventory, name: str, failed, transport) -> str:
    """The node that failed on its own: the first to end among those whose torchrun
    does not report a peer that went away."""
    ordered = sorted(failed, key=lambda v: v.ended or float("inf"))
    texts = on_nodes(inventory, [inventory.node(v.node) for v in ordered],
                     lambda n: f"cat {_q(job_dir(n, name))}/logs/rank-*.log "
                               f"{_q(job_dir(n, name))}/logs/node-{n.name}.log 2>/dev/null"
                               " | tail -n 400",
                     timeout=PROBE_TIMEOUT_S, transport=transport)
    for v in ordered:
        if not is_victim(texts.get(v.node, (1, ""))[1]):
            return v.node
    return ordered[0].node


def _blame(inventory, name: str, node: str, transport) -> str:
    from dsk_provision.jobs import blame_rank

    return blame_rank(inventory, name, node, transport=transport) or node


# --------------------------------------------------------------------------- train


@holds_cluster_lock("train")
def train(inventory, config_path: Path, *, runs_dir: Path | None = None, console=None,
          nproc_per_node: int | None = None, transport: TransportChoice = None,
          timeout_s: float | None = None, name: str | None = None, fresh: bool = False,
          detach: bool = False, max_restarts: int = 0, min_nodes: int | None = None,
          verbose: bool = False,
          interactive: bool | None = None, inventory_hint: str = "INVENTORY",
          view=None, container: str | None = None) -> TrainResult:
    """Validate the config, start the named job on every node (start_job), and, unless
    ``detach``, follow it to its end (follow_job), fetch and check the loss.
    ``container``: an image that every node runs the job in (dsk_provision.containers)."""
    from dsk_provision import rundir
    from trainer.config import load_config

    config_path = Path(config_path)
    load_config(config_path)  # InputError names file and field, before anything else
    name = check_name(name) if name else default_name(config_path)
    if view is None:
        out = getattr(console, "file", None) if console is not None else None
        view = LiveView(out, verbose=verbose)
    with InterruptGuard() as guard:
        try:
            with guard.held():  # a half-started job is not worth stopping: finish, then stop
                started = start_job(
                    inventory, config_path, name, fresh=fresh, max_restarts=max_restarts,
                    min_nodes=min_nodes, nproc_per_node=nproc_per_node,
                    transport=transport, container=container, say=view.say)
        except Interrupted as exc:
            with guard.held():
                stopped = stop_job(inventory, name, grace_s=10, transport=transport)
            raise Interrupted(exc.signum, f"interrupted by {exc.signal_name}" + (
                f"; stopped {MODULE} on {', '.join(stopped.stopped)}"
                if stopped.stopped else "")) from None
    if detach:
        view.say(f"job {name} started on {', '.join(started.nodes)}; "
                 f"dsk-provision jobs status -i {inventory_hint} {name} | "
                 f"jobs logs ... --follow | jobs stop ...")
        return TrainResult(run_dir=Path(), first_loss=None, last_loss=None, steps=0,
                           world_size=started.world_size, metrics_path=None,
                           summary_path=None, name=name, state="started")
    run_dir = rundir.new_run_dir("train", runs_dir)
    followed = follow_job(inventory, name, run_dir=run_dir, view=view, transport=transport,
                          timeout_s=timeout_s, interactive=interactive,
                          inventory_hint=inventory_hint)
    if followed.state not in ("finished", "stopped"):
        return TrainResult(run_dir=run_dir, first_loss=None, last_loss=None, steps=0,
                           world_size=started.world_size, metrics_path=None,
                           summary_path=None, name=name, state=followed.state)
    metrics_node, metrics_path, summary_path, summary = fetch_results(
        inventory, lambda node: node.settings.job_dir(name) / "out", run_dir,
        what=f"job {name}", summary=followed.state == "finished", transport=transport)
    losses = checked_losses(metrics_path, metrics_node, lambda first, last: view.say(
        f"train: job {name} {followed.state}: {first} -> {last}; metrics in {metrics_path}"))
    first_loss, last_loss = losses[0][1], losses[-1][1]
    return TrainResult(run_dir=run_dir, first_loss=first_loss, last_loss=last_loss,
                       steps=losses[-1][0], world_size=started.world_size,
                       metrics_path=metrics_path, summary_path=summary_path,
                       summary=summary, name=name, state=followed.state)


__all__ = ["FollowResult", "LiveView", "StartedJob", "follow_job", "start_command",
           "start_job", "torchrun_argv", "train"]
