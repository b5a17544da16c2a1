"""The restart rule of named jobs (trainer/resilience.py): at most --max-restarts restarts
between two checkpoints, so a job that makes progress is not killed by old failures.

The rule itself, and a real tiny job on this machine (a local-connection node, torchrun,
one CPU rank) whose rank 0 ends abruptly at chosen steps (DSK_DRILL_CRASH)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dsk_provision import jobs
from dsk_provision.inventory import load_inventory
from dsk_provision.joblaunch import start_job, torchrun_restarts
from tests.unit.test_jobs import TINY, free_port, make_local_inventory
from trainer import resilience
from trainer.config import load_config
from trainer.job import marked_pids


def test_the_count_starts_again_at_each_checkpoint():
    # attempt 1 is the launch; a checkpoint written in attempt c resets the count there
    assert resilience.restarts_since_checkpoint(1, 1) == 0
    assert resilience.restarts_since_checkpoint(3, 1) == 2
    assert resilience.restarts_since_checkpoint(3, 2) == 1
    assert resilience.restarts_since_checkpoint(3, 3) == 0
    assert not resilience.give_up(1, 1) and resilience.give_up(2, 1)
    assert resilience.give_up(1, 0) and not resilience.give_up(0, 0)


def test_torchrun_gets_a_budget_for_the_whole_run(tmp_path):
    cfg = load_config(TINY)
    assert torchrun_restarts(0, cfg) == 0
    assert torchrun_restarts(2, cfg) == 2  # no checkpoints: the count never resets
    cfg.checkpoint.interval, cfg.training.steps = 5, 40
    assert torchrun_restarts(2, cfg) == 2 * (40 // 5 + 2)


def test_min_nodes_makes_the_rendezvous_elastic_and_needs_restarts(tmp_path):
    import shlex

    from dsk_provision.errors import InputError
    from dsk_provision.joblaunch import start_command

    inv = make_local_inventory(tmp_path, 29597, nodes=3)
    line = start_command(inv, inv.nodes[2], "j", "config/tiny.toml", "L", nproc=1,
                         max_restarts=4, min_nodes=2)
    argv = shlex.split(line.split("setsid -f ", 1)[1])
    assert argv[argv.index("--nnodes") + 1] == "2:3"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in argv
    plain = shlex.split(start_command(inv, inv.nodes[2], "j", "config/tiny.toml", "L",
                                      nproc=1, max_restarts=4).split("setsid -f ", 1)[1])
    assert plain[plain.index("--nnodes") + 1] == "3"
    for bad, restarts in ((0, 1), (4, 1), (2, 0)):
        with pytest.raises(InputError) as err:
            start_job(inv, TINY, "j", max_restarts=restarts, min_nodes=bad)
        assert err.value.field == "--min-nodes"


def test_a_node_the_ranks_lost_is_the_culprit_even_when_it_does_not_answer():
    survivor = jobs.NodeView("node1", reachable=True, exists=True, state="failed",
                             exit_code=-15, reason="node node2 stopped answering ...",
                             lost_node="node2")
    dead = jobs.NodeView("node2", reachable=False, error="no answer")
    status = jobs.combine("j", [survivor, dead])
    assert (status.state, status.culprit, status.culprit_node) == (
        "failed", "node2 (lost)", "node2")
    # Without the ranks' word, a silent node leaves the state unknown.
    survivor.lost_node = None
    assert jobs.combine("j", [survivor, dead]).state == "unknown"


def _config(tmp_path: Path) -> Path:
    text = TINY.read_text()
    path = tmp_path / "cfg.toml"
    path.write_text(text.replace("\nsteps = 40\n", "\nsteps = 8\n")
                    .replace("\ninterval = 0\n", "\ninterval = 2\nkeep_last = 2\n"))
    return path


def _wait_all(inv, names: list[str], timeout: float = 300) -> dict[str, jobs.JobStatus]:
    deadline = time.monotonic() + timeout
    while True:
        status = {n: jobs.job_status(inv, n) for n in names}
        if all(s.state != "running" for s in status.values()):
            return status
        assert time.monotonic() < deadline, f"the jobs did not end within {timeout:g} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_failures_count_between_checkpoints_not_over_the_whole_run(tmp_path):
    """--max-restarts 1, a checkpoint every 2 steps; two jobs at once on two local nodes
    of their own. "ok": rank 0 dies before step 3 (after step 2's checkpoint) and, in the
    next attempt, before step 5 (after step 4's): two restarts, one per interval, and
    the job finishes. "ko": both deaths before step 3, no checkpoint between them: the
    job fails, saying why."""
    runs = {"ok": "1:3,2:5", "ko": "1:3,2:3"}
    invs = {}
    for name, crashes in runs.items():
        (tmp_path / name).mkdir()
        invs[name] = inv = make_local_inventory(tmp_path / name, free_port())
        start_job(inv, _config(tmp_path / name), name, max_restarts=1,
                  env={resilience.CRASH_VAR: crashes})
    try:
        status = {n: _wait_all(invs[n], [n])[n] for n in runs}
    finally:
        for name, inv in invs.items():
            jobs.stop_job(inv, name, grace_s=5)
    logs = {n: "".join(p.read_text() for p in sorted(
        (tmp_path / n / "node1" / "jobs" / n / "logs").glob("*.log"))) for n in runs}
    for name in runs:
        assert logs[name].count("drill: rank 0 ends abruptly") == 2, logs[name][-3000:]

    ok = status["ok"]
    assert ok.state == "finished", (ok.to_dict(), logs["ok"][-3000:])
    assert ok.trainer["step"] == 8
    assert ok.trainer["restarts"] == 2 and ok.trainer["restarts_since_checkpoint"] == 0
    ledger = json.loads((tmp_path / "ok/node1/jobs/ok/attempts-node1.json").read_text())
    assert ledger["attempts"] == 3 and ledger["checkpoint_step"] == 8

    ko = status["ko"]
    assert ko.state == "failed", (ko.to_dict(), logs["ko"][-3000:])
    view = ko.nodes[0]
    assert view.reason == ("the job was restarted 2 times since its newest checkpoint, "
                           "more than --max-restarts 1"), view
    assert view.lost_node is None and ko.trainer["step"] < 8
    assert "ending the job: the job was restarted 2 times" in logs["ko"]
    assert marked_pids("ko") == []  # the supervisor ended every process of the job


# --------------------------------------------------------------------------- a lost node


def _node_pids(name: str, job_dir: Path) -> list[int]:
    """The job's processes of one local "node": those with its job dir in their env."""
    import os

    mark = f"DSK_JOB_DIR={job_dir}".encode()
    out = []
    for pid in marked_pids(name):
        try:
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                out.append(pid)
        except OSError:
            pass
    return [p for p in out if p != os.getpid()]


def _freeze_node(name: str, job_dir: Path) -> list[int]:
    """A machine that is gone: its processes stop answering (SIGSTOP: no reset of their
    connections, no heartbeat, no exit), as when its power is cut."""
    import os
    import signal

    pids = _node_pids(name, job_dir)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def _kill(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass


def _wait_node(inv, name: str, node: str, until, timeout: float) -> jobs.NodeView:
    deadline = time.monotonic() + timeout
    while True:
        view = next(v for v in jobs.job_status(inv, name, blame=False).nodes if v.node == node)
        if until(view):
            return view
        assert time.monotonic() < deadline, f"{node}: {view}"
        time.sleep(0.5)


def _long_config(tmp_path: Path, steps: int, interval: int) -> Path:
    path = tmp_path / "long.toml"
    path.write_text(TINY.read_text().replace("\nsteps = 40\n", f"\nsteps = {steps}\n")
                    .replace("\ninterval = 0\n", f"\ninterval = {interval}\nkeep_last = 2\n"))
    return path


def _rendezvous_host(name: str, port: int, root: Path) -> str:
    """The local "node" whose torchrun listens on the rendezvous port (on one machine any
    of them may; on a cluster it is the first node)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in marked_pids(name):
        try:
            fds = {os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()}
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if fds & inodes:
            jobdir = next(e for e in env if e.startswith(b"DSK_JOB_DIR=")).decode()
            return Path(jobdir.split("=", 1)[1]).relative_to(root).parts[0]
    raise AssertionError(f"no process of job {name} listens on port {port}")


@pytest.mark.slow
def test_with_min_nodes_the_job_goes_on_without_the_lost_node(tmp_path):
    port = free_port()
    inv = make_local_inventory(tmp_path, port, nodes=4)
    hosts = inv.hosts_file  # checkpoints on a file system all three "nodes" share
    hosts.write_text(hosts.read_text().replace(
        "  children:", f"    dsk_checkpoint_dir: {tmp_path / 'shared'}\n  children:"))
    inv = load_inventory(hosts)
    steps = 300
    start_job(inv, _long_config(tmp_path, steps, 5), "mn", max_restarts=1, min_nodes=2)
    frozen: list[int] = []
    try:
        _wait_node(inv, "mn", "node1", lambda v: (v.checkpoint or {}).get("step", 0) >= 5,
                   240)
        # Not the node that holds the rendezvous (the job cannot go on without it): on a
        # cluster the first node, here whichever torchrun bound the port first; nor rank
        # 0's, whose loss the ranks do not notice yet (their store hangs).
        names = ("node1", "node2", "node3", "node4")
        keep = {"node1", _rendezvous_host("mn", port, tmp_path)} | {
            n for n in names if (tmp_path / n / "jobs/mn/out/status.json").exists()}
        victim = next(n for n in reversed(names) if n not in keep)
        survivors = [n for n in names if n != victim]
        frozen = _freeze_node("mn", tmp_path / victim / "jobs" / "mn")
        ends = [_wait_node(inv, "mn", n, lambda v: not v.running, 400) for n in survivors]
    finally:
        _kill(frozen)
        jobs.stop_job(inv, "mn", grace_s=5)
    logs = "".join(p.read_text() for n in survivors for p in sorted(
        (tmp_path / n / "jobs" / "mn" / "logs").glob("*.log")))
    assert [v.state for v in ends] == ["finished"] * 3, (ends, logs[-4000:])
    assert f"node {victim} stopped answering" in logs and "going on with the 3 other" in logs
    assert "| world 3 " in logs and "resumed from " in logs
    trainer = max((v.trainer for v in ends if v.trainer), key=lambda t: t["updated"])
    assert trainer["step"] == steps and trainer["restarts"] == 1
