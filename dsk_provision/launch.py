"""torchrun on every node: SSH command lines, shipping, log streaming, fail fast.

One torchrun per node, started over SSH (or locally for ``ansible_connection: local``):

    {dsk_python} -m torch.distributed.run --nnodes N --nproc_per_node P
        --rdzv_backend c10d --rdzv_endpoint <first node>:<dsk_rdzv_port> --rdzv_id <run-id>
        --tee 3 --log-dir <run>/torchrun-logs/<node> -m <module> <args>

The c10d rendezvous hands out node ranks itself (torchrun ignores --node_rank with it).
The trainer package and any files go to ``{dsk_root}/runs/<run-id>/`` on every node first
(a tar stream into ``tar -x`` on the node). Every output line comes back prefixed with the
node name and lands in ``<run_dir>/logs/<node>.log``. When one node's torchrun exits
non-zero the others are stopped (:func:`stop_command`: torchrun's own process group and
every process carrying the run's marker, never by name) and :class:`RunFailed` names the
node, and the rank when torchrun's report shows it. SIGINT, SIGTERM and SIGHUP stop the
job on every started node before the launcher ends (:class:`Interrupted`).

Nodes are reached through dsk_provision.remote; the transport is injectable (anything
with ``argv`` and ``popen(node, command, stdin=...)``), so tests can run "nodes" as local
processes. Paths, interpreter, rendezvous port and NCCL variables are the node's typed
settings (``node.settings``, computed by dsk_provision.inventory).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dsk_provision import preflight
from dsk_provision.errors import EnvironmentProblem, InputError, Interrupted, RunFailed
from dsk_provision.files import make_private_dir, open_private
from dsk_provision.interrupts import InterruptGuard
from dsk_provision.lock import holds_cluster_lock
from dsk_provision.remote import (
    SshTransport,
    Transport,
    TransportChoice,
    fetch,
    find_node,
    inventory_file,
    put_tar,
    resolve_transport,
    run_command,
)

TRAINER_DIR = Path(__file__).resolve().parent.parent / "trainer"
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# How long a stopped node may take before SIGKILL: torchrun itself gives its workers 30 s.
STOP_GRACE_S = 40.0
# The environment variable that marks every process of a run on a node.
RUN_MARKER_VAR = "DSK_RUN_ID"
# After the first failure, other nodes that fail within this window are failing on
# their own (or from the same cause) rather than being stopped by us.
SETTLE_S = 1.0
# Errors a rank reports when a peer went away: such a node is a victim, not the cause.
_PEER_ERROR_RE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|ECONNRESET|"
    r"DistNetworkError|NCCL communicator was aborted|remote process exited|"
    r"RendezvousClosedError|RendezvousConnectionError", re.IGNORECASE)
_ROOT_CAUSE_RANK_RE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")


# --------------------------------------------------------------------------- helpers


def remote_run_dir(node, run_id: str) -> PurePosixPath:
    """Where a run's files live on a node: {dsk_root}/runs/<run-id>."""
    return node.settings.run_dir(run_id)


class _Printer:
    """Serialises lines from the reader threads onto a rich Console or stdout."""

    def __init__(self, console=None):
        self.console = console
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            try:
                if self.console is None:
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
                else:
                    self.console.print(text, markup=False, highlight=False, soft_wrap=True)
            except OSError:
                pass  # the terminal is gone (SIGHUP): the logs still get every line


# --------------------------------------------------------------------------- command lines


def node_env(node, env: dict | None = None, *, remote_dir: PurePosixPath | str,
             run_id: str | None = None) -> dict[str, str]:
    """Environment for every rank on a node: PYTHONPATH, socket interface, NCCL variables,
    and the run's marker (see stop_command)."""
    out = {"PYTHONPATH": str(remote_dir), "PYTHONUNBUFFERED": "1"}
    if node.settings.socket_ifname:
        out["GLOO_SOCKET_IFNAME"] = node.settings.socket_ifname
    out.update(node.settings.nccl_env)
    out.update({str(k): "" if v is None else str(v) for k, v in (env or {}).items()})
    if run_id is not None:
        out[RUN_MARKER_VAR] = run_id
    return out


def nproc_for(node, nproc_per_node: int | None = None) -> int:
    """Processes on a node: the override, else the node's GPUs, else 1 (a CPU node)."""
    if nproc_per_node is not None:
        return int(nproc_per_node)
    return int(node.gpus) if node.gpus else 1


def rendezvous_endpoint(inventory) -> str:
    return preflight.rendezvous_endpoint(inventory)


def pid_file(node, run_id: str) -> PurePosixPath:
    """Holds the PID of the node's torchrun, which is also its process group's and
    session's id."""
    return remote_run_dir(node, run_id) / f"torchrun-{node.name}.pid"


def run_marker(run_id: str) -> str:
    """An environment entry that torchrun and every process it starts inherit
    (torchrun's workers run in sessions of their own, out of reach of its group)."""
    return f"{RUN_MARKER_VAR}={run_id}"


def torchrun_argv(inventory, node_index: int, module: str, module_args: list[str], *,
                  run_id: str, nproc_per_node: int | None = None) -> list[str]:
    """The torchrun argv for one node (without environment)."""
    node = inventory.nodes[node_index]
    remote = remote_run_dir(node, run_id)
    return [
        node.settings.python, "-m", "torch.distributed.run",
        "--nnodes", str(len(inventory.nodes)),
        "--nproc_per_node", str(nproc_for(node, nproc_per_node)),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", rendezvous_endpoint(inventory),
        "--rdzv_id", run_id,
        "--tee", "3",
        "--log-dir", str(remote / "torchrun-logs" / node.name),
        "-m", module, *module_args,
    ]


def torchrun_command(inventory, node_index: int, module: str, module_args: list[str], *,
                     run_id: str, nproc_per_node: int | None = None,
                     env: dict | None = None) -> str:
    """The shell line run on a node: torchrun in the run dir, leading a session of its
    own, its PID (= its process group's id) recorded first."""
    node = inventory.nodes[node_index]
    remote = remote_run_dir(node, run_id)
    argv = torchrun_argv(inventory, node_index, module, module_args, run_id=run_id,
                         nproc_per_node=nproc_per_node)
    variables = [f"{k}={shlex.quote(v)}"
                 for k, v in node_env(node, env, remote_dir=remote, run_id=run_id).items()]
    q = shlex.quote
    # setsid makes the inner shell a session and process group leader (forking first
    # when sshd already made the outer one a leader; -w waits and passes the exit code
    # on); `exec` keeps its PID, so the PID file names torchrun and its group.
    inner = (f"echo $$ > {q(str(pid_file(node, run_id)))} && "
             f"exec env {' '.join(variables)} {' '.join(q(a) for a in argv)}")
    return (f"mkdir -p {q(str(remote))} && cd {q(str(remote))} && "
            f"exec setsid -w /bin/sh -c {q(inner)}")


# Runs on the node with sh. $1: the signal.
_STOP_SCRIPT = r"""
f={pid_file}; m={marker}; r={rdzv_marker}
leader() {{
  g=; [ -f "$f" ] || return 0; p=$(cat "$f" 2>/dev/null)
  case "$p" in ''|*[!0-9]*) return 0 ;; esac
  tr '\0' '\t' < /proc/$p/cmdline 2>/dev/null | grep -qF -- "$r" || return 0
  s=$(cat /proc/$p/stat 2>/dev/null) || return 0; s=${{s##*) }}; set -- $s
  [ "$3" = "$p" ] && g=$p
}}
marked() {{
  grep -lsxzF -- "$m" /proc/[0-9]*/environ | sed -n 's#^/proc/\([0-9]*\)/environ$#\1#p'
}}
send() {{
  leader; [ -n "$g" ] && kill -"$1" -- -"$g" 2>/dev/null
  for q in $(marked); do kill -"$1" "$q" 2>/dev/null; done
}}
alive() {{ leader; [ -n "$g" ] || [ -n "$(marked)" ]; }}
send TERM
i=0
while alive && [ $i -lt {ticks} ]; do sleep 0.2; i=$((i+1)); done
alive && send KILL
exit 0
"""


def stop_command(node, run_id: str, grace_s: float | None = None) -> str:
    """Stop this run on a node: SIGTERM to torchrun's process group and to every process
    that carries the run's marker, SIGKILL to whatever is left after ``grace_s``.

    torchrun is signalled only while its PID file names a process whose command line
    still carries this run's id and that leads its own group (never by name, never a
    recycled PID); the marker reaches its workers and what they started, even after
    torchrun itself is gone. Returns when nothing of the run is left, or after the KILL.
    """
    grace = STOP_GRACE_S if grace_s is None else grace_s
    script = _STOP_SCRIPT.format(
        pid_file=shlex.quote(str(pid_file(node, run_id))),
        marker=shlex.quote(run_marker(run_id)),
        rdzv_marker=shlex.quote(f"--rdzv_id\t{run_id}\t"),
        ticks=max(1, math.ceil(grace / 0.2)))
    return f"sh -c {shlex.quote(script)}"


# --------------------------------------------------------------------------- shipping


def _tar_payload(files: dict[str, Path], include_trainer: bool = True) -> Path:
    """A tar of trainer/ (no caches) plus the given files, as a temporary file."""
    fd, name = tempfile.mkstemp(prefix="dsk-ship-", suffix=".tar")
    os.close(fd)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(name, "w") as tar:
        if include_trainer:
            if not TRAINER_DIR.is_dir():
                raise EnvironmentProblem(f"the trainer package is missing at {TRAINER_DIR}")
            tar.add(TRAINER_DIR, arcname="trainer", filter=clean)
        for arcname, local in files.items():
            tar.add(str(local), arcname=arcname, filter=clean)
    return Path(name)


def _check_ship_names(files: dict[str, Path]) -> None:
    for arcname, local in files.items():
        parts = PurePosixPath(arcname).parts
        if not parts or PurePosixPath(arcname).is_absolute() or ".." in parts:
            raise InputError(f"{arcname!r} must be a relative path inside the run directory",
                             field="files")
        if not Path(local).exists():
            raise InputError(f"{local} does not exist", field=f"files.{arcname}")


def ship(inventory, run_id: str, files: dict[str, Path] | None = None, *,
         transport: TransportChoice = None) -> None:
    """Copy trainer/ and files into {dsk_root}/runs/<run-id>/ on every node."""
    ship_to(inventory, lambda node: remote_run_dir(node, run_id), files, transport=transport)


def ship_to(inventory, destination: Callable[[object], PurePosixPath],
            files: dict[str, Path] | None = None, *, transport: TransportChoice = None) -> None:
    """Copy trainer/ and files into ``destination(node)`` on every node, all at once.

    Raises RunFailed naming every node the copy failed on, with its last line of output."""
    files = dict(files or {})
    _check_ship_names(files)
    payload = _tar_payload(files)
    failures: dict[str, str] = {}
    try:
        threads = []

        def one(node):
            rc, out = put_tar(resolve_transport(transport, inventory, node), node, payload,
                              destination(node))
            if rc != 0:
                lines = (out or "").strip().splitlines()
                failures[node.name] = lines[-1] if lines else f"exit {rc}"

        for node in inventory.nodes:
            t = threading.Thread(target=one, args=(node,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    finally:
        payload.unlink(missing_ok=True)
    if failures:
        names = sorted(failures)
        detail = "; ".join(f"{n}: {failures[n]}" for n in names)
        raise RunFailed(f"could not copy the trainer to {', '.join(names)} ({detail})",
                        nodes=names)


def fetch_from_first(inventory, remote_path: Callable[[object], PurePosixPath], local_path, *,
                     what: str, transport: TransportChoice = None) -> tuple[str, Path]:
    """Fetch ``remote_path(node)`` from the first node that has it: (its name, the local
    copy). Global rank 0 writes results, and c10d rendezvous decides which node holds
    rank 0, so the nodes are tried in inventory order; ``what`` names the file in the
    error when none has it."""
    errors = []
    for node in inventory.nodes:
        try:
            return node.name, fetch(inventory, node, remote_path(node), local_path,
                                    transport=transport)
        except RunFailed as exc:
            errors.append(str(exc))
    raise RunFailed(f"no node has {what}: " + "; ".join(errors),
                    nodes=[n.name for n in inventory.nodes])


def fetch_results(inventory, out_dir: Callable[[object], PurePosixPath], run_dir: Path, *,
                  what: str, summary: bool = True, transport: TransportChoice = None
                  ) -> tuple[str, Path, Path | None, dict]:
    """A run's ``metrics.jsonl`` from the first node whose ``out_dir(node)`` has it (rank
    0's node) and, with ``summary``, ``summary.json`` from that same node, both into
    ``run_dir``: (the node, the metrics' copy, the summary's copy or None, the summary or
    {}). ``what`` names the run or job in the error when no node has the metrics."""
    node, metrics = fetch_from_first(inventory, lambda n: out_dir(n) / "metrics.jsonl",
                                     run_dir / "metrics.jsonl",
                                     what=f"out/metrics.jsonl of {what}", transport=transport)
    if not summary:
        return node, metrics, None, {}
    path = fetch(inventory, node, out_dir(find_node(inventory, node)) / "summary.json",
                 run_dir / "summary.json", transport=transport)
    return node, metrics, path, _read_summary(path, node)


def fetch_first(inventory, remote_relative: str, run_id: str, local_path, *,
                transport: TransportChoice = None) -> tuple[str, Path]:
    """Fetch <run dir>/<remote_relative> from the first node that has it."""
    return fetch_from_first(inventory, lambda node: remote_run_dir(node, run_id) / remote_relative,
                            local_path, what=f"{remote_relative} of run {run_id}",
                            transport=transport)


# --------------------------------------------------------------------------- launching


@dataclass
class NodeRun:
    name: str
    proc: subprocess.Popen
    log_path: Path
    reader: threading.Thread | None = None
    exit_code: int | None = None
    exited_at: float | None = None
    stopped: bool = False
    # Once we stop a node, its shutdown noise (SIGTERM tracebacks) goes to its log only.
    quiet: bool = False


@dataclass
class LaunchResult:
    run_id: str
    run_dir: Path
    module: str
    nodes: list[str]
    remote_dirs: dict[str, str]
    logs: dict[str, Path]
    exit_codes: dict[str, int]
    elapsed_s: float
    world_size: int


def _stream(run: NodeRun, printer: _Printer) -> None:
    """Every line into the node's log; on the console, those that are not known-harmless
    library output (HARMLESS, the same rule as the jobs' live view)."""
    with open(run.log_path, "a", buffering=1) as log:
        for raw in run.proc.stdout:
            line = raw.rstrip("\n")
            log.write(line + "\n")
            if not run.quiet and not harmless(line):
                printer.line(f"[{run.name}] {line}")


def failed_rank(log_text: str) -> int | None:
    """The global rank in torchrun's failure report ("rank : 3 (local_rank: 1)")."""
    match = _ROOT_CAUSE_RANK_RE.search(log_text)
    return int(match.group(1)) if match else None


def is_victim(log_text: str) -> bool:
    return bool(_PEER_ERROR_RE.search(log_text))


# Library output that says nothing about the job; kept in the logs, not shown.
HARMLESS = [re.compile(p) for p in (
    r"^\*+$",
    r"Setting OMP_NUM_THREADS environment variable for each process to be 1",
    r"please further tune the variable for optimal performance",
    r"^\s*warnings\.warn\(",
    r"UserWarning: .*(TypedStorage is deprecated|barrier\(\)|No device id is provided)",
    # c10d's store client on a node whose reverse lookup of its peer fails: the connection
    # itself is made (names resolve through /etc/hosts, addresses may not resolve back)
    r"\[c10d\] The hostname of the client socket cannot be retrieved",
    # the agents of the other nodes when the node that held the rendezvous store has
    # finished first: their store client finds the socket closed while they shut the
    # rendezvous down. A job that fails is named by its exit codes and failed rank, and
    # the C++ frames of any c10 exception say nothing on a console: the log has them.
    r"\[c10d\] recvVector failed on .*Connection was likely closed",
    r"has failed to shutdown the rendezvous .* due to an error of type "
    r"RendezvousConnectionError",
    r"^(\[\w+\]:)?Exception raised from \w+ at .*\(most recent call first\):$",
    r"^(\[\w+\]:)?frame #\d+: ",
    r"^\s*$",  # the blank line that ends such a trace
)]


def harmless(text: str) -> bool:
    return any(p.search(text) for p in HARMLESS)


def _pick_culprit(failed: list[NodeRun]) -> NodeRun:
    """The node that failed on its own: first to exit among those not hurt by a peer."""
    ordered = sorted(failed, key=lambda r: r.exited_at or math.inf)
    for run in ordered:
        if not is_victim(run.log_path.read_text(errors="replace")):
            return run
    return ordered[0]


def _stop(transport: Transport, node, run: NodeRun, run_id: str) -> None:
    """Stop the run on one node, whether or not our client still follows it: a client
    that ended (a dropped connection) says nothing about the node's torchrun.

    The node-side stop command escalates from SIGTERM to SIGKILL by itself and returns
    when nothing of the run is left; it is repeated while our client still runs (its
    torchrun may not have written its PID yet), and our client is killed last.
    """
    if run.proc.poll() is None:
        run.stopped = True
    run.quiet = True
    command = stop_command(node, run_id)
    deadline = time.monotonic() + STOP_GRACE_S + 15
    while True:
        run_command(transport, node, command, timeout=STOP_GRACE_S + 30)
        try:
            run.proc.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                break
    run.proc.kill()  # our own client; the remote side is gone or unreachable
    run.proc.wait()
    # A remote command that started only now is stopped by its PID file all the same.
    run_command(transport, node, command, timeout=STOP_GRACE_S + 30)


def _stop_all(inventory, runs: list[NodeRun], transports: dict, run_id: str,
              which: Callable[[NodeRun], bool] = lambda _run: True) -> None:
    """_stop on every started node that ``which`` picks, all at once."""
    by_name = {n.name: n for n in inventory.nodes}
    chosen = [run for run in runs if which(run)]
    # Marked before any stop goes out: where nodes share a host (the local test nodes),
    # one node's stop can end another's run before that node's own stop looks at it.
    for run in chosen:
        if run.proc.poll() is None:
            run.stopped = True
    threads = []
    for run in chosen:
        t = threading.Thread(target=_stop, args=(transports[run.name], by_name[run.name],
                                                 run, run_id), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


@holds_cluster_lock("launch")
def run_torchrun(inventory, module: str, module_args: list[str], *, run_dir: Path,
                 files: dict[str, Path] | None = None, nproc_per_node: int | None = None,
                 env: dict | None = None, console=None, timeout_s: float | None = None,
                 transport: TransportChoice = None) -> LaunchResult:
    """Ship, start torchrun on every node, stream logs, fail fast. Raises RunFailed.

    SIGINT, SIGTERM and SIGHUP stop the output, then the job on every node that was
    started, and raise Interrupted (exit code 130, 143, 129).
    """
    if not inventory.nodes:
        raise InputError("the inventory has no nodes", file=inventory_file(inventory),
                         field="all.children.nodes.hosts")
    if not _MODULE_RE.match(module):
        raise InputError(f"{module!r} is not a Python module name", field="module")
    run_dir = Path(run_dir)
    run_id = run_dir.name
    if not _RUN_ID_RE.match(run_id):
        raise InputError(f"run directory name {run_id!r} cannot be a run id", field="run_dir")
    if nproc_per_node is not None and nproc_per_node < 1:
        raise InputError("must be at least 1", field="nproc_per_node")
    transports = {n.name: resolve_transport(transport, inventory, n) for n in inventory.nodes}
    commands = [torchrun_command(inventory, i, module, list(module_args), run_id=run_id,
                                 nproc_per_node=nproc_per_node, env=env)
                for i in range(len(inventory.nodes))]
    printer = _Printer(console)
    log_dir = make_private_dir(run_dir / "logs")

    with InterruptGuard() as guard:
        with guard.held():  # a half-shipped run is not worth stopping: finish, then stop
            ship(inventory, run_id, files, transport=transport)
        started = time.monotonic()
        runs: list[NodeRun] = []
        try:
            with guard.held():  # every client started is recorded, so it can be stopped
                for node, command in zip(inventory.nodes, commands, strict=True):
                    log_path = log_dir / f"{node.name}.log"
                    open_private(log_path, "w").close()
                    run = NodeRun(node.name, transports[node.name].popen(node, command),
                                  log_path)
                    runs.append(run)
                    run.reader = threading.Thread(target=_stream, args=(run, printer),
                                                  daemon=True)
                    run.reader.start()
            timed_out = _watch(runs, started, timeout_s)
        except BaseException as exc:
            with guard.held():
                for run in runs:
                    run.quiet = True
                names = ", ".join(r.name for r in runs)
                if isinstance(exc, Interrupted) and runs:
                    printer.line(f"{exc.signal_name}: stopping {module} on {names} "
                                 f"(SIGKILL after {STOP_GRACE_S:g} s)")
                _stop_all(inventory, runs, transports, run_id)
            if isinstance(exc, Interrupted):
                stopped = [r.name for r in runs if r.stopped]
                raise Interrupted(exc.signum, f"interrupted by {exc.signal_name}" + (
                    f"; stopped {module} on {', '.join(stopped)}" if stopped else ""),
                    hint=f"logs in {log_dir}") from None
            raise
        failed = [r for r in runs if r.exit_code not in (None, 0)]
        if failed or timed_out:
            with guard.held():
                # Give nodes that fail on their own a moment to say so before we stop
                # the rest.
                settle_until = time.monotonic() + SETTLE_S
                while time.monotonic() < settle_until and any(r.proc.poll() is None
                                                              for r in runs):
                    _collect(runs)
                    time.sleep(0.05)
                for run in runs:
                    if run.proc.poll() is None:
                        run.quiet = True
                        printer.line(f"[{run.name}] stopping (its output goes on in "
                                     f"{run.log_path})")
                # Nodes whose client ended are stopped too: an ssh connection that
                # dropped leaves its torchrun running. Only those that finished well
                # are left alone.
                _stop_all(inventory, runs, transports, run_id,
                          which=lambda r: r.proc.poll() is None or r.proc.returncode != 0)
    _collect(runs)
    for run in runs:
        if run.reader:
            run.reader.join(timeout=10)
    elapsed = time.monotonic() - started
    exit_codes = {r.name: r.proc.returncode for r in runs}
    failed = [r for r in runs if r.exit_code not in (None, 0) and not r.stopped]
    stopped = [r.name for r in runs if r.stopped]
    if timed_out and not failed:
        raise RunFailed(f"{module} did not finish within {timeout_s:g} s; stopped "
                        f"{', '.join(stopped)}", nodes=stopped,
                        hint=f"logs in {log_dir}")
    if failed:
        culprit = _pick_culprit(failed)
        rank = failed_rank(culprit.log_path.read_text(errors="replace"))
        who = f"rank {rank} on {culprit.name}" if rank is not None else culprit.name
        parts = [f"{module} failed: {who} exited with code {culprit.exit_code}"]
        if culprit.exit_code == 255 and isinstance(transports[culprit.name], SshTransport):
            parts[0] += " (ssh could not connect, or the connection dropped)"
        others = [r.name for r in failed if r is not culprit]
        if others:
            parts.append(f"then {', '.join(others)} failed too")
        if stopped:
            parts.append(f"stopped {', '.join(stopped)}")
        raise RunFailed("; ".join(parts), nodes=[culprit.name],
                        hint=f"see {culprit.log_path}")
    return LaunchResult(
        run_id=run_id, run_dir=run_dir, module=module, nodes=[r.name for r in runs],
        remote_dirs={n.name: str(remote_run_dir(n, run_id)) for n in inventory.nodes},
        logs={r.name: r.log_path for r in runs}, exit_codes=exit_codes, elapsed_s=elapsed,
        world_size=sum(nproc_for(n, nproc_per_node) for n in inventory.nodes))


def _collect(runs: list[NodeRun]) -> None:
    now = time.monotonic()
    for run in runs:
        if run.exit_code is None and run.proc.poll() is not None:
            run.exit_code = run.proc.returncode
            run.exited_at = now


def _watch(runs: list[NodeRun], started: float, timeout_s: float | None) -> bool:
    """Wait until all exit 0, one fails, or time runs out (returns True on timeout)."""
    while True:
        _collect(runs)
        if any(r.exit_code not in (None, 0) for r in runs):
            return False
        if all(r.exit_code == 0 for r in runs):
            return False
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            return True
        time.sleep(0.1)


# --------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    run_dir: Path
    first_loss: float | None
    last_loss: float | None
    steps: int
    world_size: int
    metrics_path: Path | None
    summary_path: Path | None
    summary: dict = field(default_factory=dict)
    name: str = ""
    state: str = "finished"     # finished, stopped, detached (still running), started


def _losses(metrics_path: Path) -> list[tuple[int, float]]:
    out = []
    for number, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFailed(f"{metrics_path}:{number}: not JSON ({exc})") from None
        if "loss" in record:
            out.append((int(record.get("step", number)), float(record["loss"])))
    return out


def trainer_invocation(config_path: Path) -> tuple[str, list[str], dict[str, Path]]:
    """The trainer's module, its arguments and the files shipped with it, for a config.

    Every node has the same layout under its own dsk_root; the trainer resolves paths
    relative to its working directory, the run dir (metrics and checkpoints in out/)."""
    shipped_config = f"config/{Path(config_path).name}"
    return "trainer.train", ["--config", shipped_config, "--out", "out"], {
        shipped_config: Path(config_path)}


def _read_summary(path: Path, node: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFailed(f"{path}: not JSON ({exc})", nodes=[node]) from None


def checked_losses(metrics_path: Path, metrics_node: str, say) -> list[tuple[int, float]]:
    """The (step, loss) pairs of a run's metrics, said first and last, all finite."""
    losses = _losses(metrics_path)
    if not losses:
        raise RunFailed(f"{metrics_path} has no loss values", nodes=[metrics_node])
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    say(f"loss {first:.4f} (step {first_step})", f"{last:.4f} (step {last_step})")
    if not all(math.isfinite(loss) for _, loss in losses):
        bad = next(step for step, loss in losses if not math.isfinite(loss))
        raise RunFailed(f"the loss is not finite from step {bad} on (see {metrics_path})",
                        nodes=[metrics_node])
    return losses


def train_result(inventory, run_dir: Path, world_size: int, *, console=None,
                 transport: TransportChoice = None) -> TrainResult:
    """Fetch a finished run's metrics and summary from the node that wrote them (global
    rank 0's) in the run directory ``run_dir.name`` on the nodes, and check its loss (the
    Slurm launcher ends a run with this)."""
    run_id = run_dir.name
    printer = _Printer(console)
    metrics_node, metrics_path, summary_path, summary = fetch_results(
        inventory, lambda node: remote_run_dir(node, run_id) / "out", run_dir,
        what=f"run {run_id}", transport=transport)
    losses = checked_losses(metrics_path, metrics_node, lambda first, last: printer.line(
        f"train: {first} -> {last}; metrics in {metrics_path}"))
    return TrainResult(run_dir=run_dir, first_loss=losses[0][1], last_loss=losses[-1][1],
                       steps=losses[-1][0], world_size=world_size, metrics_path=metrics_path,
                       summary_path=summary_path, summary=summary)


__all__ = [
    "HARMLESS", "LaunchResult", "TrainResult", "fetch_first", "fetch_from_first",
    "fetch_results", "harmless", "node_env",
    "nproc_for", "remote_run_dir", "run_marker", "run_torchrun", "ship", "stop_command",
    "torchrun_argv", "torchrun_command", "train_result", "trainer_invocation",
]
