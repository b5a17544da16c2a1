"""The node side of a training job: run torchrun detached, stop it, say how it is doing.

``dsk-provision train`` ships the trainer into the job's directory on every node
(``{dsk_root}/jobs/<name>/``) and starts, in it, one supervisor per node as the leader of a
session of its own (``setsid``), its output in ``logs/node-<node>.log``:

    python -m trainer.job run --node NODE -- <torchrun argv>

The supervisor records itself in ``node-<node>.json`` (its PID, the launch, the state),
runs torchrun, waits for it and records how it ended (finished, failed with its exit code,
or stopped). It depends on no SSH session of the control node: closing those leaves it
running. ``stop`` and ``status`` are run over SSH by ``dsk-provision jobs``; they print one
JSON object. Standard library only (no torch): they run quickly on any node.

Every process of the job carries ``DSK_JOB=<name>`` in its environment (torchrun starts
its workers in sessions of their own, out of reach of its process group); ``stop`` finds
them by it, never by name.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.jobstate import JOB_DIR_VAR

JOB_MARKER_VAR = "DSK_JOB"
STOP_FILE = "stop-requested"
JOB_FILE = "job.json"
STATUS_FILE = "out/status.json"
LOG_DIR = "logs"
NODE_VAR = "DSK_NODE"            # trainer.resilience.NODE_VAR
ABORT_FILE = "abort.json"        # trainer.resilience.ABORT_FILE
ABORT_POLL_S = 0.5


def node_record(job_dir: Path, node: str) -> Path:
    return job_dir / f"node-{node}.json"


def write_json(path: Path, data: dict) -> None:
    """Written whole: a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def supervisor_pid(job_dir: Path, node: str) -> int | None:
    """The PID of this node's supervisor while it runs: the record's PID, checked against
    the process's command line (a recycled PID is not the supervisor)."""
    record = read_json(node_record(job_dir, node)) or {}
    pid = record.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    argv = _cmdline(pid)
    if "trainer.job" in argv and "run" in argv and node in argv:
        try:
            if Path(f"/proc/{pid}/cwd").resolve() == job_dir.resolve():
                return pid
        except OSError:
            return None
    return None


def marked_pids(name: str) -> list[int]:
    """Every process whose environment carries this job's marker."""
    marker = f"{JOB_MARKER_VAR}={name}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and _alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def _own_pids(name: str, job_dir: Path) -> list[int]:
    """The job's processes of this node: marked, and started for this job directory
    (``DSK_JOB_DIR``; several "nodes" may share one machine) or for none named."""
    mine = os.path.realpath(job_dir)
    prefix = JOB_DIR_VAR.encode() + b"="
    out = []
    for pid in marked_pids(name):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        dirs = [v[len(prefix):].decode(errors="replace") for v in environ
                if v.startswith(prefix)]
        if not dirs or os.path.realpath(dirs[0]) == mine:
            out.append(pid)
    return out


def _rank_pids(pids: list[int]) -> list[int]:
    """The ranks among the job's processes: torchrun gives its workers LOCAL_RANK."""
    out = []
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"LOCAL_RANK=") for v in environ):
            out.append(pid)
    return out


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


# --------------------------------------------------------------------------- run


def run(job_dir: Path, node: str, argv: list[str], launch: str) -> int:
    """Supervise torchrun on this node until it ends; record how."""
    if os.getpid() != os.getsid(0):
        try:
            os.setsid()
        except OSError:
            pass  # already a group leader: started by setsid, which is what counts
    record_path = node_record(job_dir, node)
    record = {"node": node, "launch": launch, "pid": os.getpid(), "state": "running",
              "started": time.time(), "exit_code": None, "ended": None}
    write_json(record_path, record)
    stopping = []

    def on_term(signum, _frame):
        # A stop (trainer.job stop) signals the ranks itself; the supervisor stays until
        # torchrun has ended, to record it.
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {node}: starting {' '.join(argv)}",
          flush=True)
    (job_dir / ABORT_FILE).unlink(missing_ok=True)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **{NODE_VAR: node}))
    except OSError as exc:
        print(f"{node}: cannot start torchrun: {exc}", flush=True)
        record.update(state="failed", exit_code=127, ended=time.time())
        write_json(record_path, record)
        return 127
    aborted = None
    while True:
        try:
            code = proc.wait(timeout=ABORT_POLL_S)
            break
        except subprocess.TimeoutExpired:
            aborted = _abort_request(job_dir, launch)
            if aborted:
                code = _end_torchrun(proc, aborted, job_dir)
                break
        except InterruptedError:
            continue
    stopped = (job_dir / STOP_FILE).exists()
    state = "stopped" if stopped and not aborted else (
        "finished" if code == 0 and not aborted else "failed")
    record.update(state=state, exit_code=code, ended=time.time())
    if aborted:
        record.update(reason=aborted.get("reason"), lost_node=aborted.get("lost_node"))
    write_json(record_path, record)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {node}: torchrun exited with code {code} "
          f"({state})", flush=True)
    return 0 if state != "failed" else 1


def _abort_request(job_dir: Path, launch: str) -> dict | None:
    """A rank's request to end the job as failed (trainer.resilience.abort), this launch's."""
    data = read_json(job_dir / ABORT_FILE)
    return data if data and data.get("launch") == launch else None


def _end_torchrun(proc: subprocess.Popen, aborted: dict, job_dir: Path) -> int:
    """End torchrun and the job's processes on this node (their ranks wait for this),
    SIGTERM then SIGKILL; returns torchrun's exit code."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ending the job: {aborted.get('reason')}",
          flush=True)
    name = os.environ.get(JOB_MARKER_VAR, "")
    me = os.getpid()
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        _signal([proc.pid] + [p for p in _own_pids(name, job_dir) if p != me], sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not [p for p in _own_pids(name, job_dir)
                                                if p != me]:
                return proc.returncode
            time.sleep(0.1)
    return proc.wait()


# --------------------------------------------------------------------------- stop


def stop(job_dir: Path, node: str, name: str, grace_s: float, kill_after_s: float = 10.0
         ) -> dict:
    """Ask the ranks to stop (SIGTERM: the trainer saves a checkpoint at the next step
    boundary and exits), wait ``grace_s`` for every process of the job to end, then
    SIGTERM to all of them and SIGKILL ``kill_after_s`` later. Returns what happened."""
    (job_dir / STOP_FILE).write_text(f"{time.time()}\n")
    started = time.monotonic()
    sup = supervisor_pid(job_dir, node)
    pids = marked_pids(name)
    ranks = _rank_pids(pids)
    escalated = None
    if ranks:
        _signal(ranks, signal.SIGTERM)
    else:
        # No rank yet (rendezvous, start-up): nothing to checkpoint, torchrun ends itself.
        escalated = "TERM"
        _signal([p for p in pids if p != sup], signal.SIGTERM)

    def left() -> list[int]:
        alive = marked_pids(name)
        s = supervisor_pid(job_dir, node)
        return alive + ([s] if s else [])

    deadline = started + grace_s
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    if left():
        escalated = "TERM"
        _signal(left(), signal.SIGTERM)
        deadline = time.monotonic() + kill_after_s
        while left() and time.monotonic() < deadline:
            time.sleep(0.2)
        if left():
            escalated = "KILL"
            _signal(left(), signal.SIGKILL)
            deadline = time.monotonic() + 5
            while left() and time.monotonic() < deadline:
                time.sleep(0.1)
    # A supervisor that was killed records nothing: say here that the node stopped.
    record = read_json(node_record(job_dir, node)) or {}
    if record.get("state") == "running" and supervisor_pid(job_dir, node) is None:
        record.update(state="stopped", ended=time.time())
        write_json(node_record(job_dir, node), record)
    return {"node": node, "had_supervisor": sup is not None, "ranks_signalled": len(ranks),
            "escalated": escalated, "left": left(),
            "seconds": round(time.monotonic() - started, 1)}


# --------------------------------------------------------------------------- status


def latest_checkpoint(ckpt_root: Path) -> dict | None:
    """The newest complete checkpoint (step directory with COMPLETE) under ckpt_root."""
    try:
        found = [p for p in ckpt_root.iterdir() if p.name.startswith("step-")
                 and p.name[5:].isdigit() and (p / "COMPLETE").is_file()]
    except OSError:
        return None
    if not found:
        return None
    newest = max(found, key=lambda p: int(p.name[5:]))
    return {"step": int(newest.name[5:]), "path": str(newest),
            "time": (newest / "COMPLETE").stat().st_mtime}


def status(job_dir: Path, node: str) -> dict:
    """This node's view of the job: its supervisor's record, whether it runs, rank 0's
    status file when this node holds it, the newest complete checkpoint."""
    job = read_json(job_dir / JOB_FILE) or {}
    record = read_json(node_record(job_dir, node))
    ckpt_root = Path(job.get("checkpoint_dir") or job_dir / "checkpoints")
    return {
        "node": node,
        "job": job,
        "record": record,
        "running": supervisor_pid(job_dir, node) is not None,
        "processes": len(marked_pids(job.get("name", job_dir.name))),
        "stop_requested": (job_dir / STOP_FILE).exists(),
        "trainer": read_json(job_dir / STATUS_FILE),
        "checkpoint": latest_checkpoint(ckpt_root),
        "now": time.time(),
    }


# --------------------------------------------------------------------------- logs


def _log_files(job_dir: Path, node: str, rank: int | None, node_log: bool) -> list[Path]:
    logs = job_dir / LOG_DIR
    out = [logs / f"node-{node}.log"] if node_log and rank is None else []
    if rank is not None:
        out.append(logs / f"rank-{rank}.log")
    else:
        ranks = sorted(logs.glob("rank-*.log"),
                       key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)
        out += ranks
    return [p for p in out if p.is_file()]


def _prefix(node: str, path: Path) -> str:
    if path.name.startswith("rank-"):
        return f"[{node} rank {path.stem[5:]}] "
    return f"[{node}] "


def follow(job_dir: Path, node: str, *, keep_following: bool, lines: int | None,
           rank: int | None = None, node_log: bool = True, poll_s: float = 0.2) -> None:
    """Print the job's logs on this node, each line prefixed with the node (and rank):
    the last ``lines`` lines of each file (all with None), then, with
    ``keep_following``, what is appended until this node's supervisor has ended."""
    offsets: dict[Path, int] = {}
    partial: dict[Path, bytes] = {}
    out = sys.stdout

    def start_offset(path: Path) -> int:
        if lines is None:
            return 0
        data = path.read_bytes()
        cut = len(data)
        for _ in range(lines + 1):
            cut = data.rfind(b"\n", 0, cut)
            if cut < 0:
                return 0
        return cut + 1

    def drain(final: bool = False) -> bool:
        got = False
        for path in _log_files(job_dir, node, rank, node_log):
            if path not in offsets:
                offsets[path] = start_offset(path)
            try:
                with open(path, "rb") as fh:
                    fh.seek(offsets[path])
                    data = fh.read()
            except OSError:
                continue
            if not data:
                continue
            got = True
            offsets[path] += len(data)
            data = partial.pop(path, b"") + data
            *complete, rest = data.split(b"\n")
            if rest and final:
                complete.append(rest)
            elif rest:
                partial[path] = rest
            prefix = _prefix(node, path)
            for raw in complete:
                out.write(prefix + raw.decode(errors="replace").rstrip("\r") + "\n")
        out.flush()
        return got

    drain(final=not keep_following)
    while keep_following:
        running = supervisor_pid(job_dir, node) is not None
        got = drain()
        if not running and not got:
            drain(final=True)
            return
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.job")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="supervise torchrun on this node (in the job dir)")
    p_run.add_argument("--node", required=True)
    p_run.add_argument("--launch", default="")
    p_run.add_argument("argv", nargs=argparse.REMAINDER)
    p_stop = sub.add_parser("stop", help="stop the job's processes on this node")
    p_stop.add_argument("--node", required=True)
    p_stop.add_argument("--grace", type=float, default=120.0)
    p_status = sub.add_parser("status", help="this node's view of the job, as JSON")
    p_status.add_argument("--node", required=True)
    p_logs = sub.add_parser("logs", help="this node's logs, prefixed with node and rank")
    p_logs.add_argument("--node", required=True)
    p_logs.add_argument("--rank", type=int)
    p_logs.add_argument("--lines", type=int, help="the last N lines of each file")
    p_logs.add_argument("--follow", action="store_true")
    args = parser.parse_args(argv)
    job_dir = Path.cwd()
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return run(job_dir, args.node, command, args.launch)
    if args.command == "logs":
        try:
            follow(job_dir, args.node, keep_following=args.follow, lines=args.lines,
                   rank=args.rank)
        except BrokenPipeError:
            pass
        return 0
    name = (read_json(job_dir / JOB_FILE) or {}).get("name", job_dir.name)
    if args.command == "stop":
        print(json.dumps(stop(job_dir, args.node, name, args.grace)), flush=True)
        return 0
    print(json.dumps(status(job_dir, args.node)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
