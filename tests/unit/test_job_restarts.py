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
from helpers import first_node_transport, free_port

from dsk_provision import jobs
from dsk_provision.inventory import load_inventory
from dsk_provision.joblaunch import start_job, torchrun_restarts
from tests.unit.test_jobs import TINY, make_local_inventory
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


def test_the_node_watch_times_are_one_setting_checked_before_any_connection(
        tmp_path, monkeypatch):
    import shlex

    from dsk_provision.errors import InputError
    from dsk_provision.joblaunch import start_command

    monkeypatch.delenv(resilience.WATCH_VAR, raising=False)
    assert resilience.watch_timing() == (resilience.HEARTBEAT_S, resilience.LOST_AFTER_S)
    assert resilience.watch_timing("1:5") == (1.0, 5.0)
    monkeypatch.setenv(resilience.WATCH_VAR, "2:4.5")
    assert resilience.watch_timing() == (2.0, 4.5)
    for bad in ("5", "a:b", "0.5:3", "5:9", "1:2:3", "inf:inf", "nan:nan", "-1:5"):
        with pytest.raises(ValueError, match=f"{resilience.WATCH_VAR} must be "
                           "HEARTBEAT_S:LOST_AFTER_S .*default 5:30"):
            resilience.watch_timing(bad)

    inv = make_local_inventory(tmp_path, 29596, nodes=2)
    with pytest.raises(InputError) as err:  # given to start_job
        start_job(inv, TINY, "j", env={resilience.WATCH_VAR: "1:1"})
    assert err.value.field == resilience.WATCH_VAR and "not '1:1'" in str(err.value)
    monkeypatch.setenv(resilience.WATCH_VAR, "0:1")  # or in train's own environment
    with pytest.raises(InputError):
        start_job(inv, TINY, "j")
    assert not (tmp_path / "node1" / "jobs").exists()  # nothing was shipped

    # The ranks get the value; torchrun's rendezvous follows it, on node1 only as host.
    def conf(node, env):
        line = start_command(inv, node, "j", "config/tiny.toml", "L", nproc=1,
                             max_restarts=1, env=env)
        argv = shlex.split(line.split("setsid -f ", 1)[1])
        return argv[argv.index("--rdzv_conf") + 1], argv
    value, argv = conf(inv.nodes[1], {resilience.WATCH_VAR: "1:5"})
    assert value == "is_host=0,keep_alive_interval=1,last_call_timeout=5"
    assert f"{resilience.WATCH_VAR}=1:5" in argv
    assert conf(inv.nodes[0], None)[0] == (
        "is_host=1,keep_alive_interval=5,last_call_timeout=30")  # torch's own defaults


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
    from concurrent.futures import ThreadPoolExecutor

    runs = {"ok": "1:3,2:5", "ko": "1:3,2:3"}
    invs = {}
    for name in runs:
        (tmp_path / name).mkdir()
        invs[name] = make_local_inventory(tmp_path / name, free_port())
    with ThreadPoolExecutor(len(runs)) as pool:  # both start at once
        starts = [pool.submit(start_job, invs[name], _config(tmp_path / name), name,
                              max_restarts=1, env={resilience.CRASH_VAR: crashes})
                  for name, crashes in runs.items()]
    try:
        for started in starts:
            started.result()
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


# Heartbeat 1 s, lost after 5 s (the rendezvous keep-alives follow: dsk_provision.joblaunch).
WATCH = {resilience.WATCH_VAR: "1:5"}


def _start(tmp_path: Path, name: str, nodes: int, *, steps: int, interval: int,
           shared: bool, env: dict | None = None, rank0: str = "node1"):
    """A job of ``nodes`` local "nodes", rank 0 on ``rank0``, the rendezvous on node1,
    --min-nodes 2."""
    port = free_port()
    inv = make_local_inventory(tmp_path, port, nodes=nodes)
    if shared:  # checkpoints on a file system all the "nodes" share
        hosts = inv.hosts_file
        hosts.write_text(hosts.read_text().replace(
            "  children:", f"    dsk_checkpoint_dir: {tmp_path / 'shared'}\n  children:"))
        inv = load_inventory(hosts)
    start_job(inv, _long_config(tmp_path, steps, interval), name, max_restarts=1,
              min_nodes=2, env={**WATCH, **(env or {})},
              transport=first_node_transport(rank0, " -m trainer.job run "))
    return inv, port


def _roles(inv, name: str, port: int, tmp_path: Path, rank0: str = "node1") -> None:
    """Rank 0 (it writes out/status.json) is ``rank0``'s, the rendezvous node1's."""
    _wait_node(inv, name, rank0, lambda v: (v.trainer or {}).get("step", 0) >= 1, 120)
    assert _rendezvous_host(name, port, tmp_path) == "node1"
    others = [n.name for n in inv.nodes if n.name != rank0
              and (tmp_path / n.name / "jobs" / name / "out/status.json").exists()]
    assert others == [], f"rank 0 is not {rank0}'s: {others} wrote status.json"


def _lose_a_node_and_go_on(tmp_path: Path, name: str, *, lost: str, rank0: str) -> str:
    """An 8-step job on 3 local nodes (--min-nodes 2, checkpoints shared, one every 2
    steps, rank 0 on ``rank0``): ``lost`` freezes while it saves step 4, after step 2's
    checkpoint is complete; the other two must go on without it from step 2 and finish.
    Returns the survivors' logs."""
    steps = 8
    inv, port = _start(tmp_path, name, 3, steps=steps, interval=2, shared=True,
                       env={resilience.SAVE_PAUSE_VAR: f"{lost}:4:120"}, rank0=rank0)
    frozen: list[int] = []
    survivors = [n.name for n in inv.nodes if n.name != lost]
    try:
        _roles(inv, name, port, tmp_path, rank0=rank0)
        _wait_node(inv, name, rank0, lambda v: (v.checkpoint or {}).get("step", 0) >= 2,
                   120)
        frozen = _freeze_node(name, tmp_path / lost / "jobs" / name)
        ends = [_wait_node(inv, name, n, lambda v: not v.running, 240) for n in survivors]
    finally:
        _kill(frozen)
        jobs.stop_job(inv, name, grace_s=5)
    logs = "".join(p.read_text() for n in survivors for p in sorted(
        (tmp_path / n / "jobs" / name / "logs").glob("*.log")))
    assert [v.state for v in ends] == ["finished"] * 2, (ends, logs[-4000:])
    assert "going on with the 2 other" in logs
    assert "| world 2 " in logs and "resumed from " in logs and "step-000002" in logs
    trainer = max((v.trainer for v in ends if v.trainer), key=lambda t: t["updated"])
    # one restart: torchrun's count on the node whose trainer wrote last; should another
    # attempt follow, the supervisors' logs say what ended the one before it
    supervisors = "".join(p.read_text() for n in survivors for p in sorted(
        (tmp_path / n / "jobs" / name / "logs").glob("node-*.log")))
    assert trainer["step"] == steps and trainer["restarts"] == 1, (
        trainer, supervisors[-3000:], logs[-3000:])
    return logs


@pytest.mark.slow
def test_with_min_nodes_the_job_goes_on_without_the_lost_node(tmp_path):
    """--min-nodes 2 of 3, checkpoints shared, a checkpoint every 2 steps: node3 (neither
    rank 0's node nor the rendezvous node) freezes while it saves step 4 (after step
    2's checkpoint is complete, so the freeze always lands before the job ends); the
    other two notice its heartbeat standing still, go on without it from step 2, and
    finish."""
    logs = _lose_a_node_and_go_on(tmp_path, "mn", lost="node3", rank0="node1")
    assert "node node3 stopped answering (no heartbeat for" in logs


@pytest.mark.slow
def test_the_loss_of_rank_0s_node_is_survived_when_it_is_not_the_rendezvous(tmp_path):
    """Rank 0 on node2 (it holds the ranks' store), the rendezvous on node1, --min-nodes
    2 of 3, checkpoints shared: node2 freezes while it saves step 4; the others' watch
    finds the ranks' store silent and names node2, and the job goes on from step 2 on
    node1 and node3, with a new rank 0 and a new store, and finishes."""
    logs = _lose_a_node_and_go_on(tmp_path, "r0", lost="node2", rank0="node2")
    assert "node node2 stopped answering (the ranks' store there silent for" in logs, \
        logs[-4000:]


@pytest.mark.slow
def test_the_loss_of_the_rendezvous_and_rank_0_node_ends_the_job_naming_it(tmp_path):
    """node1 holds the rendezvous and rank 0 (the ranks' store): frozen, the other
    nodes' store calls hang. Their watch gives up on the store within the lost-after
    time and names node1; even with --min-nodes the job cannot go on without its
    rendezvous, so it fails on every other node, and `jobs status` names the node."""
    inv, port = _start(tmp_path, "rz", 3, steps=100000, interval=0, shared=False)
    frozen: list[int] = []
    survivors = ["node2", "node3"]
    try:
        _roles(inv, "rz", port, tmp_path)
        frozen = _freeze_node("rz", tmp_path / "node1" / "jobs" / "rz")
        froze = time.monotonic()
        ends = [_wait_node(inv, "rz", n, lambda v: not v.running, 60) for n in survivors]
        took = time.monotonic() - froze
        left = [p for n in survivors for p in _node_pids("rz", tmp_path / n / "jobs/rz")]
        _kill(frozen)  # the node is gone for good: its supervisor records nothing
        frozen = []
        status = jobs.job_status(inv, "rz")
    finally:
        _kill(frozen)
        jobs.stop_job(inv, "rz", grace_s=5)
    logs = "".join(p.read_text() for n in survivors for p in sorted(
        (tmp_path / n / "jobs" / "rz" / "logs").glob("*.log")))
    assert took < 60, took
    for view in ends:
        assert (view.state, view.lost_node) == ("failed", "node1"), (view, logs[-4000:])
        assert view.reason.startswith("node node1 stopped answering (the ranks' store "
                                      "there silent for "), view.reason
        assert "held the job's rendezvous" in view.reason and "--min-nodes" in view.reason
    assert left == []  # the supervisors ended every process of the job on their nodes
    assert (status.state, status.culprit, status.culprit_node) == (
        "failed", "node1 (lost)", "node1"), status.to_dict()
