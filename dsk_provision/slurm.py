"""Training through Slurm: one sbatch script per job, submitted on the controller, followed.

`train --launcher slurm` (or ``dsk_launcher: slurm``) ships the trainer to every node
as the SSH launcher does, writes ``job.sbatch`` into the run directory and submits it
with ``sbatch`` on the controller (``dsk_slurm_controller``, else the first node) over
SSH. The script asks for N nodes with one task each and runs one torchrun per node
through ``srun``:

    srun --kill-on-bad-exit=1 --label /bin/sh -c '<node env>; exec torchrun
        --nnodes $SLURM_JOB_NUM_NODES --nproc_per_node P --rdzv_backend c10d
        --rdzv_endpoint $DSK_RDZV_ENDPOINT --rdzv_id <run-id> ... -m trainer.train ...'

The c10d rendezvous is on the job's first node (Slurm picks the nodes; the script maps
its name to the inventory's address and rendezvous port). Every rank gets the
environment the SSH launcher gives it (``launch.node_env``: PYTHONPATH, socket
interface, NCCL variables, the run's marker); variables that differ between nodes are
set per node inside the srun step. A failing task ends the step (--kill-on-bad-exit),
torchrun does not restart workers (as with the SSH launcher) and the job is not
requeued (--no-requeue): see docs/trainer.md for why.

The job's output (``slurm-<job id>.out`` in the run directory of its first node) is
followed over SSH until the job ends; an interrupt or the timeout cancels the job
(scancel). The result is read as after an SSH launch (``launch.train_result``).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dsk_provision import defaults
from dsk_provision.addresses import host_port
from dsk_provision.errors import InputError, Interrupted, RunFailed
from dsk_provision.files import make_private_dir, open_private
from dsk_provision.interrupts import InterruptGuard
from dsk_provision.lock import holds_cluster_lock
from dsk_provision.remote import TransportChoice, resolve_transport, run_command
from dsk_provision.slurmctl import (
    POLL_S,
    JobState,
    cancel,
    controller,
    follow_command,
    job_state,
)

SCRIPT_NAME = "job.sbatch"
# %j: Slurm's job id.
OUTPUT_PATTERN = "slurm-%j.out"
LAUNCHERS = ("ssh", "slurm")
# [days-]hours:minutes:seconds, hours:minutes:seconds, minutes:seconds or minutes.
_TIME_RE = re.compile(r"^(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})$")
_PARTITION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_JOB_ID_RE = re.compile(r"^(\d+)(;\S+)?$")


@dataclass(frozen=True)
class SlurmOptions:
    """What a job asks Slurm for; None leaves it to the inventory or to Slurm."""

    nodes: int | None = None            # default: every node in service
    gpus_per_node: int | None = None    # default: the nodes' GPUs (dsk_gpus)
    time_limit: str | None = None       # sbatch --time; default: the partition's
    partition: str | None = None        # sbatch --partition; default: Slurm's default


def launcher(inventory, choice: str | None = None) -> str:
    """The launcher to use: the option, else dsk_launcher (roles/dsk_defaults)."""
    name = choice or str(defaults.resolve("dsk_launcher", inventory.vars or {}))
    if name not in LAUNCHERS:
        raise InputError(f"unknown launcher {name!r}; use one of {', '.join(LAUNCHERS)}",
                         field="launcher")
    return name


def _same(inventory, what: str, value) -> str:
    values = {str(value(n)) for n in inventory.nodes}
    if len(values) != 1:
        raise InputError(f"the slurm launcher needs one {what} on every node, not "
                         f"{', '.join(sorted(values))}", field=what)
    return values.pop()


def job_shape(inventory, options: SlurmOptions,
              nproc_per_node: int | None = None) -> tuple[int, int, int]:
    """(nodes, GPUs per node, processes per node) of a job, checked against the inventory."""
    nodes = options.nodes if options.nodes is not None else len(inventory.nodes)
    if not 1 <= nodes <= len(inventory.nodes):
        raise InputError(f"--nodes {nodes}: the cluster has {len(inventory.nodes)} nodes in "
                         "service", field="nodes")
    if options.gpus_per_node is not None:
        gpus = options.gpus_per_node
    else:
        gpus = int(_same(inventory, "dsk_gpus", lambda n: int(n.gpus or 0)))
    if gpus < 0:
        raise InputError("must be at least 0", field="gpus_per_node")
    if nproc_per_node is not None and nproc_per_node < 1:
        raise InputError("must be at least 1", field="nproc_per_node")
    nproc = nproc_per_node or gpus or 1
    if options.time_limit is not None and not _TIME_RE.match(options.time_limit):
        raise InputError(f"{options.time_limit!r} is not a Slurm time limit",
                         field="time_limit", hint="minutes, or [days-]hours:minutes:seconds")
    if options.partition is not None and not _PARTITION_RE.match(options.partition):
        raise InputError(f"{options.partition!r} is not a partition name", field="partition")
    return nodes, gpus, nproc


def sbatch_script(inventory, module: str, module_args: list[str], *, run_id: str,
                  options: SlurmOptions = SlurmOptions(), nproc_per_node: int | None = None,
                  env: dict | None = None, job_name: str | None = None) -> str:
    """The sbatch script of one job: its #SBATCH options, then one torchrun per node
    through srun, with the environment launch.node_env gives each node."""
    from dsk_provision.launch import node_env, remote_run_dir

    nodes, gpus, nproc = job_shape(inventory, options, nproc_per_node)
    remote = PurePosixPath(_same(inventory, "dsk_root", lambda n: remote_run_dir(n, run_id)))
    python = _same(inventory, "dsk_python", lambda n: n.settings.python)
    q = shlex.quote
    envs = {n.name: node_env(n, env, remote_dir=remote, run_id=run_id)
            for n in inventory.nodes}
    common = {k: v for k, v in envs[inventory.nodes[0].name].items()
              if all(e.get(k) == v for e in envs.values())}
    lines = [
        "#!/bin/bash",
        f"# Written by dsk-provision for run {run_id}: one torchrun per node through srun.",
        f"#SBATCH --job-name={job_name or f'dsk-{run_id}'}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if options.time_limit:
        lines.append(f"#SBATCH --time={options.time_limit}")
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    lines += [
        f"#SBATCH --chdir={remote}",
        f"#SBATCH --output={remote / OUTPUT_PATTERN}",
        "#SBATCH --no-requeue",
        "set -eu",
        *(f"export {k}={q(v)}" for k, v in common.items()),
        "# The c10d rendezvous runs on the job's first node, at its inventory address.",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'case "$first" in',
        *(f"  {q(n.name)}) DSK_RDZV_ENDPOINT={q(host_port(n.address, n.settings.rdzv_port))} ;;"
          for n in inventory.nodes),
        '  *) echo "dsk: $first is not a node of the inventory" >&2; exit 2 ;;',
        "esac",
        "export DSK_RDZV_ENDPOINT",
    ]
    per_node = []
    for name, variables in envs.items():
        own = [f"{k}={q(v)}" for k, v in variables.items() if k not in common]
        if own:
            per_node.append(f"  {q(name)}) export {' '.join(own)} ;;")
    # Words the step's shell expands (Slurm's variables) are double-quoted; every other
    # word is quoted literally.
    torchrun = [q(python), "-m", "torch.distributed.run",
                "--nnodes", '"$SLURM_JOB_NUM_NODES"', "--nproc_per_node", str(nproc),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", '"$DSK_RDZV_ENDPOINT"',
                "--rdzv_id", q(run_id), "--tee", "3",
                "--log-dir", q(f"{remote}/torchrun-logs/") + '"$SLURMD_NODENAME"',
                "-m", q(module), *(q(a) for a in module_args)]
    step = []
    if per_node:
        step += ['case "$SLURMD_NODENAME" in', *per_node, "esac"]
    step.append("exec " + " ".join(torchrun))
    lines += [
        "# One task per node; a task that fails ends the others.",
        "exec srun --kill-on-bad-exit=1 --label --ntasks-per-node=1 /bin/sh -c "
        + q("\n".join(step)),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the job


def submit(inventory, script_path: PurePosixPath, *, transport: TransportChoice = None,
           test_only: bool = False) -> tuple[str, str]:
    """sbatch on the controller: (job id, sbatch's output). With test_only, Slurm only
    says when and where the job would run (sbatch --test-only) and the id is ''."""
    node = controller(inventory)
    flags = "--test-only" if test_only else "--parsable"
    rc, out = run_command(resolve_transport(transport, inventory, node), node,
                          f"sbatch {flags} {shlex.quote(str(script_path))}", timeout=60)
    if rc != 0:
        raise RunFailed(f"sbatch on {node.name} failed (exit {rc}): {out.strip()[-500:]}",
                        nodes=[node.name])
    if test_only:
        return "", out
    match = _JOB_ID_RE.match(out.strip().splitlines()[-1] if out.strip() else "")
    if not match:
        raise RunFailed(f"sbatch on {node.name} printed no job id: {out.strip()[-500:]}",
                        nodes=[node.name])
    return match.group(1), out


def drain_command(node: str, reason: str | None) -> str:
    """scontrol's drain of ``node`` with ``reason``, or (None) its resume."""
    q = shlex.quote
    if reason is None:
        return f"scontrol update nodename={q(node)} state=resume"
    return f"scontrol update nodename={q(node)} state=drain reason={q(reason)}"


def set_drain(inventory, node: str, reason: str | None, *,
              transport: TransportChoice = None) -> None:
    """Drain ``node`` in Slurm with ``reason`` (running jobs finish, no new one starts
    there), or resume it (None). Resuming a node Slurm does not hold drained is no error."""
    ctl = controller(inventory)
    rc, out = run_command(resolve_transport(transport, inventory, ctl), ctl,
                          drain_command(node, reason), timeout=60)
    if rc != 0 and not (reason is None and "Invalid node state" in out):
        what = "resume" if reason is None else "drain"
        raise RunFailed(f"scontrol on {ctl.name} could not {what} {node} (exit {rc}): "
                        f"{out.strip()[-300:]}", nodes=[ctl.name])


@dataclass
class SlurmRun:
    job_id: str
    state: JobState
    log_path: Path


def submit_job(inventory, script: str, *, name: str, run_dir: Path, files: dict[str, Path],
               nproc_per_node: int, transport: TransportChoice = None):
    """Ship the trainer and the script to every node, submit it, and record the job on the
    control node (slurmjobs) for the jobs commands. Returns the slurmjobs.SlurmJob."""
    from dsk_provision import slurmjobs
    from dsk_provision.launch import remote_run_dir, ship

    run_id = run_dir.name
    local_script = run_dir / SCRIPT_NAME
    with open_private(local_script, "w") as fh:
        fh.write(script)
    remote = remote_run_dir(inventory.nodes[0], run_id)
    ship(inventory, run_id, {**files, SCRIPT_NAME: local_script}, transport=transport)
    job_id, _ = submit(inventory, remote / SCRIPT_NAME, transport=transport)
    job = slurmjobs.SlurmJob(name=name, job_id=job_id, run_id=run_id, remote_dir=str(remote),
                             nproc_per_node=nproc_per_node, submitted=time.time())
    slurmjobs.save(inventory, job)
    return job


def refuse_running_name(inventory, name: str, *, transport: TransportChoice = None) -> None:
    """A name already given to a Slurm job that Slurm still runs is not given again."""
    from dsk_provision import slurmjobs

    job = slurmjobs.load(inventory, name)
    if job is None:
        return
    job = slurmjobs.refresh(inventory, job, transport=transport)
    if slurmjobs.active(job.state):
        raise InputError(f"job {name!r} is Slurm job {job.job_id}, still {job.state}",
                         field="--name", hint=f"dsk-provision jobs stop -i INVENTORY {name}, "
                                              "or another --name")


def run_job(inventory, script: str, *, run_dir: Path, files: dict[str, Path],
            console=None, timeout_s: float | None = None,
            transport: TransportChoice = None, name: str | None = None,
            nproc_per_node: int = 1) -> SlurmRun:
    """Ship the trainer and the script, submit it, follow its output until it ends.
    Raises RunFailed unless the job completed; Interrupted after cancelling it."""
    from dsk_provision import slurmjobs
    from dsk_provision.launch import _Printer

    printer = _Printer(console)
    log_dir = make_private_dir(run_dir / "logs")
    with InterruptGuard() as guard:
        with guard.held():
            job = submit_job(inventory, script, name=name or f"dsk-{run_dir.name}",
                             run_dir=run_dir, files=files, nproc_per_node=nproc_per_node,
                             transport=transport)
        job_id = job.job_id
        printer.line(f"train: submitted Slurm job {job_id} ({job.name}) on "
                     f"{controller(inventory).name}")
        log_path = log_dir / f"slurm-{job_id}.log"
        open_private(log_path, "w").close()
        started = time.monotonic()
        try:
            state = _wait(inventory, job_id, log_path, printer, started, timeout_s, transport)
        except BaseException as exc:
            with guard.held():
                cancel(inventory, job_id, transport=transport)
            if isinstance(exc, Interrupted):
                raise Interrupted(exc.signum, f"interrupted by {exc.signal_name}; cancelled "
                                  f"Slurm job {job_id}", hint=f"log in {log_path}") from None
            raise
    if state is not None:
        job.state, job.exit_code, job.reason = state.state, state.exit_code, state.reason
        job.batch_host = state.batch_host
        slurmjobs.save(inventory, job)
    if state is None:
        raise RunFailed(f"Slurm job {job_id} ended but Slurm no longer knows how",
                        hint=f"log in {log_path}")
    if state.state != "COMPLETED" or state.exit_code not in ("0:0", ""):
        why = f" ({state.reason})" if state.reason not in ("", "None") else ""
        raise RunFailed(f"Slurm job {job_id} ended {state.state}{why}, exit code "
                        f"{state.exit_code}, on {state.nodes}", hint=f"see {log_path}")
    return SlurmRun(job_id=job_id, state=state, log_path=log_path)


def _wait(inventory, job_id: str, log_path: Path, printer, started: float,
          timeout_s: float | None, transport: TransportChoice) -> JobState | None:
    """Follow the job's output from its first node until Slurm says it ended."""
    from dsk_provision.launch import remote_run_dir
    from dsk_provision.remote import find_node

    follower: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    state = job_state(inventory, job_id, transport=transport)
    try:
        while state is not None and state.active:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise RunFailed(f"Slurm job {job_id} did not finish within {timeout_s:g} s; "
                                "cancelled it", hint=f"log in {log_path}")
            if follower is None and state.batch_host not in ("", "(null)"):
                node = find_node(inventory, state.batch_host)
                remote_log = remote_run_dir(node, log_path.parent.parent.name) / \
                    OUTPUT_PATTERN.replace("%j", job_id)
                follower = resolve_transport(transport, inventory, node).popen(
                    node, follow_command(remote_log, job_id))
                reader = threading.Thread(target=_copy, args=(follower, log_path, printer),
                                          daemon=True)
                reader.start()
            time.sleep(POLL_S)
            state = job_state(inventory, job_id, transport=transport)
        if follower is not None:
            try:
                follower.wait(timeout=POLL_S * 3 + 5)
            except subprocess.TimeoutExpired:
                follower.kill()
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        if reader is not None:
            reader.join(timeout=10)
    return state


def _copy(proc: subprocess.Popen, log_path: Path, printer) -> None:
    with open(log_path, "a", buffering=1) as log:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            log.write(line + "\n")
            printer.line(f"[slurm] {line}")


@holds_cluster_lock("train")
def train(inventory, config_path: Path, *, runs_dir: Path | None = None, console=None,
          nproc_per_node: int | None = None, options: SlurmOptions = SlurmOptions(),
          dry_run: bool = False, transport: TransportChoice = None,
          timeout_s: float | None = None, name: str | None = None, detach: bool = False):
    """Validate the config for the job's world size, then either return the sbatch script
    (dry_run: nothing is written or started), or submit the job as ``name`` (default:
    <config>-<time>, see jobs.default_name) and return its slurmjobs.SlurmJob (detach) or,
    once it ended, its TrainResult."""
    from dsk_provision import rundir
    from dsk_provision.jobs import check_name, default_name
    from dsk_provision.launch import _Printer, train_result, trainer_invocation
    from trainer.config import check_world_size, load_config

    config_path = Path(config_path)
    cfg = load_config(config_path)  # InputError names file and field
    controller(inventory)
    nodes, _gpus, nproc = job_shape(inventory, options, nproc_per_node)
    world_size = nodes * nproc
    check_world_size(cfg, world_size)
    module, module_args, files = trainer_invocation(config_path)
    name = check_name(name) if name is not None else default_name(config_path)
    if dry_run:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-train"
        return sbatch_script(inventory, module, module_args, run_id=run_id, options=options,
                             nproc_per_node=nproc_per_node, job_name=name)
    refuse_running_name(inventory, name, transport=transport)
    run_dir = rundir.new_run_dir("train", runs_dir)
    script = sbatch_script(inventory, module, module_args, run_id=run_dir.name,
                           options=options, nproc_per_node=nproc_per_node, job_name=name)
    printer = _Printer(console)
    printer.line(f"train: Slurm job {name} of {nodes} nodes, world size {world_size}, "
                 f"config {config_path}, run {run_dir}")
    if detach:
        job = submit_job(inventory, script, name=name, run_dir=run_dir, files=files,
                         nproc_per_node=nproc, transport=transport)
        printer.line(f"train: submitted Slurm job {job.job_id} ({name}); follow it with "
                     f"`dsk-provision jobs logs -i INVENTORY {name} --follow`")
        return job
    run_job(inventory, script, run_dir=run_dir, files=files, console=console,
            timeout_s=timeout_s, transport=transport, name=name, nproc_per_node=nproc)
    return train_result(inventory, run_dir, world_size, console=console, transport=transport)


__all__ = ["LAUNCHERS", "SlurmOptions", "SlurmRun", "drain_command", "job_shape",
           "launcher", "refuse_running_name", "run_job", "sbatch_script", "set_drain",
           "submit", "submit_job", "train"]
