"""Named jobs without a sandbox: the node-side supervisor (trainer/job.py), the job's state
from each node's view, the live view, command lines, and one real tiny job on this
machine (a local-connection node): detached start, status, stop with a checkpoint,
relaunch that continues."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from dsk_provision import jobs
from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory
from dsk_provision.joblaunch import LiveView, harmless, start_command
from trainer import job as node_job

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"


def run_supervisor(job_dir: Path, node: str, argv: list[str], name: str = "j"):
    """trainer.job run as the launcher starts it, in the job dir, with the job marker."""
    (job_dir / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), DSK_JOB=name)
    with open(job_dir / "logs" / f"node-{node}.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "trainer.job", "run", "--node", node,
                                 "--launch", "L1", "--", *argv], cwd=job_dir, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_record(job_dir: Path, node: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = node_job.read_json(node_job.node_record(job_dir, node)) or {}
        if record.get("state") == state:
            return record
        time.sleep(0.05)
    raise AssertionError(f"node record never reached {state}: {record}")


@pytest.mark.parametrize(("code", "state"), [(0, "finished"), (3, "failed")])
def test_supervisor_records_how_torchrun_ended(tmp_path, code, state):
    proc = run_supervisor(tmp_path, "n1", [sys.executable, "-c",
                                           f"print('hello'); raise SystemExit({code})"])
    proc.wait(timeout=30)
    record = wait_record(tmp_path, "n1", state)
    assert record["exit_code"] == code and record["launch"] == "L1"
    log = (tmp_path / "logs" / "node-n1.log").read_text()
    assert "hello" in log and f"exited with code {code} ({state})" in log
    assert node_job.supervisor_pid(tmp_path, "n1") is None


def test_stop_escalates_and_leaves_nothing(tmp_path):
    # A "torchrun" that ignores SIGTERM, with a child in a session of its own.
    stubborn = ("import signal, subprocess, sys, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'], "
                "start_new_session=True); time.sleep(300)")
    name = f"stop-{os.getpid()}"
    proc = run_supervisor(tmp_path, "n1", [sys.executable, "-c", stubborn], name=name)
    try:
        wait_record(tmp_path, "n1", "running")
        deadline = time.monotonic() + 20
        while len(node_job.marked_pids(name)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(node_job.marked_pids(name)) == 3  # supervisor, torchrun, its child
        assert node_job.supervisor_pid(tmp_path, "n1") == proc.pid
        result = node_job.stop(tmp_path, "n1", name, grace_s=0.5, kill_after_s=1)
        assert result["escalated"] == "KILL" and result["left"] == []
        assert node_job.marked_pids(name) == []
        assert (tmp_path / node_job.STOP_FILE).exists()
        assert node_job.status(tmp_path, "n1")["record"]["state"] == "stopped"
    finally:
        for pid in node_job.marked_pids(name):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_logs_prefix_node_and_rank_and_take_the_last_lines(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "node-n1.log").write_text("torchrun says\n")
    (logs / "rank-0.log").write_text("a\nb\nc\n")
    (logs / "rank-10.log").write_text("x\ny")  # no newline yet: printed at the end
    node_job.follow(tmp_path, "n1", keep_following=False, lines=2)
    assert capsys.readouterr().out.splitlines() == [
        "[n1] torchrun says", "[n1 rank 0] b", "[n1 rank 0] c", "[n1 rank 10] x",
        "[n1 rank 10] y"]
    node_job.follow(tmp_path, "n1", keep_following=False, lines=None, rank=0)
    assert capsys.readouterr().out.splitlines() == ["[n1 rank 0] a", "[n1 rank 0] b",
                                                    "[n1 rank 0] c"]


def view(tmp_path, **ckpt) -> jobs.NodeView:
    return jobs.NodeView(**{"node": "n", "reachable": True, "exists": True, **ckpt})


@pytest.mark.parametrize(("views", "state", "culprit"), [
    ([dict(node="a", running=True, state="running"), dict(node="b", state="failed",
                                                          ended=5.0)], "running", None),
    ([dict(node="a", running=True, stop_requested=True)], "stopping", None),
    ([dict(node="a", state="finished"), dict(node="b", state="finished")], "finished", None),
    ([dict(node="a", state="failed", ended=9.0), dict(node="b", state="failed", ended=3.0)],
     "failed", "b"),
    # A supervisor that died without recording (kill -9, a rebooted node): failed.
    ([dict(node="a", state="running"), dict(node="b", state="finished")], "failed", "a"),
    ([dict(node="a", state="stopped", stop_requested=True)], "stopped", None),
    ([dict(node="a", running=False, state="finished"), dict(node="b", reachable=False)],
     "unknown", None),
])
def test_job_state_from_the_nodes_views(tmp_path, views, state, culprit):
    status = jobs.combine("j", [view(tmp_path, **v) for v in views])
    assert status.state == state
    assert status.culprit == culprit


def test_a_job_nowhere_is_an_input_error():
    with pytest.raises(InputError, match="no job named 'nope'"):
        jobs.combine("nope", [jobs.NodeView("a", reachable=True)])


def test_names():
    assert jobs.default_name(Path("configs/small.toml"), now=0).startswith("small-19700101-")
    assert jobs.check_name("run.1_a-b") == "run.1_a-b"
    for bad in ("", "-x", "a/b", "a b", "x" * 65, "../up"):
        with pytest.raises(InputError):
            jobs.check_name(bad)


def make_local_inventory(tmp_path: Path, port: int, nodes: int = 1):
    hosts = tmp_path / "inventory" / "hosts.yml"
    hosts.parent.mkdir(parents=True)
    lines = ["all:", "  vars:", "    ansible_connection: local", "    dsk_gpus_per_node: 0",
             f"    dsk_python: {sys.executable}", f"    dsk_rdzv_port: {port}",
             "  children:", "    nodes:", "      hosts:"]
    for i in range(1, nodes + 1):
        lines.append(f"        node{i}: {{ansible_host: 127.0.0.{i}, dsk_root: "
                     f"{tmp_path / f'node{i}'}}}")
    hosts.write_text("\n".join(lines) + "\n")
    return load_inventory(hosts)


def test_start_command_runs_the_supervisor_in_a_session_of_its_own(tmp_path):
    inv = make_local_inventory(tmp_path, 29599, nodes=2)
    line = start_command(inv, inv.nodes[1], "j1", "config/tiny.toml", "L9", nproc=2,
                         max_restarts=3)
    assert f"cd {tmp_path / 'node2' / 'jobs' / 'j1'} && rm -f stop-requested" in line
    assert "setsid -f env " in line and "DSK_JOB=j1" in line
    assert f"DSK_JOB_DIR={tmp_path / 'node2' / 'jobs' / 'j1'}" in line
    tail = shlex.split(line.split("setsid -f ", 1)[1])
    argv = tail[tail.index("--") + 1:tail.index(">>")]
    assert argv[argv.index("--max-restarts") + 1] == "3"
    assert argv[argv.index("--rdzv_endpoint") + 1] == "127.0.0.1:29599"
    assert argv[argv.index("--checkpoint-dir") + 1] == str(
        tmp_path / "node2" / "jobs" / "j1" / "checkpoints")
    assert tail[-4:] == [">>", "logs/node-node2.log", "2>&1", "<"] or "< /dev/null" in line


def test_checkpoint_dir_setting_puts_each_job_under_it(tmp_path):
    inv = make_local_inventory(tmp_path, 29598)
    node = inv.nodes[0]
    assert str(node.settings.checkpoint_dir("j")) == str(tmp_path / "node1/jobs/j/checkpoints")
    hosts = inv.hosts_file
    hosts.write_text(hosts.read_text().replace("  children:",
                                               "    dsk_checkpoint_dir: /shared/ckpt\n"
                                               "  children:"))
    assert str(load_inventory(hosts).nodes[0].settings.checkpoint_dir("j")) == "/shared/ckpt/j"


def test_live_view_redraws_rank_0_progress_on_a_terminal():
    out = io.StringIO()
    v = LiveView(out, tty=True)
    v.line("n1", None, "*****************************************")
    v.line("n1", "0", "step 1/40 | loss 5.5 | tok/s 100 | mfu - | mem 0.1 GiB")
    v.line("n1", "0", "step 2/40 | loss 5.0 | tok/s 110 | mfu - | mem 0.1 GiB")
    v.line("n2", "1", "step 2/40 | loss 5.0")            # another rank: not shown
    v.line("n2", "1", "RuntimeError: boom")               # its errors are
    v.close()
    text = out.getvalue()
    assert "*****" not in text
    assert text.count("\r\x1b[2K") >= 3  # redrawn in place
    assert "[n1 rank 0] step 2/40 | loss 5.0 | tok/s 110 | mfu - | eta " in text
    assert "[n2 rank 1] RuntimeError: boom\n" in text
    assert "[n2 rank 1] step" not in text


def test_live_view_plain_lines_and_verbose():
    out = io.StringIO()
    v = LiveView(out, tty=False)
    v.line("n1", "0", "step 1/4 | loss 5.5 | tok/s 100 | mfu 41.0% | mem 0.1 GiB")
    v.line("n1", None, "Setting OMP_NUM_THREADS environment variable for each process to "
                       "be 1 in default")
    assert out.getvalue() == "[n1 rank 0] step 1/4 | loss 5.5 | tok/s 100 | mfu 41.0% | eta -\n"
    out = io.StringIO()
    v = LiveView(out, tty=False, verbose=True)
    v.line("n2", "1", "step 2/4 | loss 5.0")
    v.line("n1", None, "*****")
    assert out.getvalue() == "[n2 rank 1] step 2/4 | loss 5.0\n[n1] *****\n"
    assert harmless("***") and not harmless("RuntimeError: x")
    assert harmless("[W1204 15:40:01.123456789 socket.cpp:767] [c10d] The hostname of the "
                    "client socket cannot be retrieved. err=-3")
    assert not harmless("[E1204 socket.cpp:1019] [c10d] The client socket has timed out "
                        "after 60000ms while trying to connect to (h200, 29500).")


@pytest.mark.slow
def test_a_real_job_stops_with_a_checkpoint_and_continues(tmp_path):
    """tiny.toml on this machine through the whole path: detached start, status,
    stop (final checkpoint, nothing left), relaunch of the same name (the step goes on)."""
    from dsk_provision.joblaunch import train

    inv = make_local_inventory(tmp_path, free_port())
    cfg = tmp_path / "long.toml"
    cfg.write_text(TINY.read_text().replace("\nsteps = 40\n", "\nsteps = 100000\n")
                   .replace("\ninterval = 0\n", "\ninterval = 1000\nkeep_last = 1\n"))
    quiet = LiveView(io.StringIO(), tty=False)
    started = train(inv, cfg, name="j", detach=True, view=quiet)
    assert started.state == "started"
    try:
        deadline = time.monotonic() + 240
        while True:
            status = jobs.job_status(inv, "j")
            if (status.trainer or {}).get("step", 0) >= 2:
                break
            assert status.state == "running", status.to_dict()
            assert time.monotonic() < deadline, "no step 2 within 240 s"
            time.sleep(0.5)
        result = jobs.stop_job(inv, "j", grace_s=120)
        assert result.stopped == ["node1"] and not result.left and not result.escalated
        status = jobs.job_status(inv, "j")
        assert status.state == "stopped"
        step = status.trainer["step"]
        # Not a multiple of the interval: saved because of the stop.
        assert result.checkpoint["step"] == step
        assert node_job.marked_pids("j") == []
        rank_log = tmp_path / "node1" / "jobs" / "j" / "logs" / "rank-0.log"
        assert f"stopped at step {step}: a checkpoint saved" in rank_log.read_text()
        # Launching the same name again continues after that step (2 more steps).
        cfg.write_text(cfg.read_text().replace("\nsteps = 100000\n",
                                               f"\nsteps = {step + 2}\n"))
        again = train(inv, cfg, name="j", view=quiet, runs_dir=tmp_path / "runs",
                      timeout_s=240)
        assert again.state == "finished" and again.steps == step + 2
        assert again.summary["start_step"] == step
        assert jobs.job_status(inv, "j").state == "finished"
        assert json.loads((tmp_path / "node1/jobs/j/job.json").read_text())["name"] == "j"
    finally:
        jobs.stop_job(inv, "j", grace_s=5)


def test_cli_fresh_needs_a_name_and_a_confirmation(tmp_path):
    from typer.testing import CliRunner

    from dsk_provision.cli import app

    inv = make_local_inventory(tmp_path, 29597)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "-i", str(inv.hosts_file), "--config", str(TINY),
                                 "--fresh"])
    assert result.exit_code == 2 and "--fresh needs the --name" in result.output
    result = runner.invoke(app, ["train", "-i", str(inv.hosts_file), "--config", str(TINY),
                                 "--fresh", "--name", "j"])
    assert result.exit_code == 2 and "confirm with --yes" in result.output
    assert not (tmp_path / "node1").exists()  # nothing was touched


def test_jobs_commands_name_a_job_that_does_not_exist(tmp_path):
    from typer.testing import CliRunner

    from dsk_provision.cli import app

    inv = make_local_inventory(tmp_path, 29596)
    runner = CliRunner()
    for args in (["status", "nope"], ["stop", "nope"], ["logs", "nope"]):
        result = runner.invoke(app, ["jobs", args[0], "-i", str(inv.hosts_file), args[1]])
        assert result.exit_code == 2, (args, result.output)
        assert "no job named 'nope'" in result.output
    result = runner.invoke(app, ["jobs", "list", "-i", str(inv.hosts_file)])
    assert result.exit_code == 0 and "no jobs" in result.output
