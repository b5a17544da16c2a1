"""Named jobs on the 3-node sandbox: detached start, status, logs, stop, resume, restarts.

tiny.toml on CPU (gloo), three ranks, one per node. Every job is stopped in `finally`,
so the shared sandbox is left as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dsk_provision import jobs
from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory
from dsk_provision.joblaunch import train
from dsk_provision.launch import fetch_from_first
from trainer.resilience import WATCH_VAR

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"
EXE = Path(sys.prefix) / "bin" / "dsk-provision"
# The job's processes on a node, found by the marker in their environment.
JOB_PIDS = ("for p in /proc/[0-9]*; do grep -qzx 'DSK_JOB={name}' $p/environ 2>/dev/null "
            "&& echo ${{p#/proc/}}; done; true")
RANK_PIDS = ("for p in /proc/[0-9]*; do grep -qzx 'DSK_JOB={name}' $p/environ 2>/dev/null "
             "&& grep -qz '^LOCAL_RANK=' $p/environ && echo ${{p#/proc/}}; done; true")


@dataclass
class Sandbox:
    inventory_path: Path
    nodes: list


def config(tmp_path: Path, steps: int, interval: int, name: str = "cfg") -> Path:
    text = TINY.read_text()
    assert "\nsteps = 40\n" in text and "\ninterval = 0\n" in text
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace("\nsteps = 40\n", f"\nsteps = {steps}\n")
                    .replace("\ninterval = 0\n", f"\ninterval = {interval}\nkeep_last = 2\n"))
    return path


def cli(sandbox, *args, check=True, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`dsk-provision train ...` or `dsk-provision jobs SUB ...` on the sandbox (``env``:
    extra environment variables)."""
    command = list(args[:2]) if args[0] == "jobs" else [args[0]]
    rest = list(args[len(command):])
    proc = subprocess.run([str(EXE), *command, "-i", str(sandbox.inventory_path), *rest],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        pytest.fail(f"dsk-provision {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def status(sandbox, name: str) -> dict:
    return json.loads(cli(sandbox, "jobs", "status", name, "--json").stdout)


def wait_for(predicate, what: str, timeout: float = 240, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(every)


def left_on_nodes(sandbox, node_ssh, name: str) -> dict[str, str]:
    left = {}
    for node, ip in sandbox.nodes:
        out = node_ssh(ip, JOB_PIDS.format(name=name)).stdout.strip()
        if out:
            left[node] = out
    return left


def losses(inventory, name: str, tmp_path: Path) -> dict[int, float]:
    _node, path = fetch_from_first(
        inventory, lambda node: node.settings.job_dir(name) / "out/metrics.jsonl",
        tmp_path / f"{name}-metrics.jsonl", what=f"out/metrics.jsonl of job {name}")
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture
def one_node_inventory(sandbox_cluster, tmp_path):
    """The sandbox's inventory with node2 and node3 cordoned: jobs run on node1 alone,
    where checkpoints on the node's own disk can be continued from (docs/trainer.md)."""
    data = yaml.safe_load(Path(sandbox_cluster.inventory_path).read_text())
    hosts = data["all"]["children"]["nodes"]["hosts"]
    for name in ("node2", "node3"):
        hosts[name]["dsk_cordoned"] = "jobs test: one-node checkpoints"
    path = tmp_path / "inventory" / "hosts.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def cleanup(sandbox_cluster):
    names: list[str] = []
    yield names
    inventory = load_inventory(sandbox_cluster.inventory_path)
    for name in names:
        try:
            jobs.stop_job(inventory, name, grace_s=5)
        except InputError:
            pass


def test_detached_job_status_logs_and_stop_on_three_nodes(sandbox_cluster, node_ssh,
                                                          tmp_path, cleanup):
    sandbox = Sandbox(sandbox_cluster.inventory_path, sandbox_cluster.nodes)
    cfg = config(tmp_path, steps=100000, interval=1000)
    cleanup.append("j3")
    started = time.monotonic()
    out = cli(sandbox, "train", "--config", str(cfg), "--name", "j3", "--detach", "--fresh",
              "--yes")
    assert "job j3 started on node1, node2, node3" in out.stdout
    assert time.monotonic() - started < 60
    running = wait_for(lambda: (s := status(sandbox, "j3"))["state"] == "running"
                       and (s["trainer"] or {}).get("step", 0) >= 2 and s, "step 2")
    assert all(n["running"] for n in running["nodes"]), running
    assert any("j3" == j["name"] and j["state"] == "running" for j in json.loads(
        cli(sandbox, "jobs", "list", "--json").stdout)["jobs"])
    # A few lines of the logs, following.
    follower = subprocess.Popen([str(EXE), "jobs", "logs", "-i", str(sandbox.inventory_path),
                                 "j3", "--follow", "--rank", "0"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        lines = [follower.stdout.readline() for _ in range(3)]
    finally:
        os.killpg(follower.pid, signal.SIGTERM)
        follower.wait(timeout=30)
    assert all(line.startswith("[node") and " rank 0] " in line for line in lines), lines

    stopped = cli(sandbox, "jobs", "stop", "j3")
    assert "stopped on node1, node2, node3" in stopped.stdout, stopped.stdout
    assert left_on_nodes(sandbox, node_ssh, "j3") == {}
    after = status(sandbox, "j3")
    assert after["state"] == "stopped", after
    # Saved because of the stop (the interval is 1000).
    assert after["checkpoint"]["step"] == after["trainer"]["step"] >= 2, after


def test_relaunch_continues_like_an_uninterrupted_run(sandbox_cluster, node_ssh, tmp_path,
                                                      cleanup, one_node_inventory):
    sandbox = Sandbox(one_node_inventory, sandbox_cluster.nodes)
    inventory = load_inventory(one_node_inventory).in_service()
    cfg = config(tmp_path, steps=30, interval=3)
    cleanup.extend(["ref", "j1"])
    reference = train(inventory, cfg, runs_dir=tmp_path / "runs", name="ref", fresh=True,
                      timeout_s=600)
    assert reference.state == "finished" and reference.steps == 30
    expected = losses(inventory, "ref", tmp_path)

    cli(sandbox, "train", "--config", str(cfg), "--name", "j1", "--detach", "--fresh", "--yes")
    wait_for(lambda: (status(sandbox, "j1")["trainer"] or {}).get("step", 0) >= 2, "step 2")
    cli(sandbox, "jobs", "stop", "j1")
    after = status(sandbox, "j1")
    stop_step = after["trainer"]["step"]
    assert after["state"] == "stopped" and after["checkpoint"]["step"] == stop_step, after
    assert stop_step < 30, "the job finished before it was stopped"

    # Relaunch: it continues from that checkpoint, detached; the control node's ssh
    # connections (a follower's) are killed while it runs; it finishes all the same.
    cli(sandbox, "train", "--config", str(cfg), "--name", "j1", "--detach")
    follower = subprocess.Popen([str(EXE), "jobs", "logs", "-i", str(sandbox.inventory_path),
                                 "j1", "--follow"], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Its ssh clients (children in sessions of their own): node1's follows the job.
        clients = wait_for(lambda: subprocess.run(
            ["pgrep", "-P", str(follower.pid), "-x", "ssh"], capture_output=True,
            text=True).stdout.split(), "the follower's ssh clients", 60, every=0.1)
        for pid in clients:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass  # a client of a node without the job, already ended
    finally:
        follower.kill()
        follower.wait(timeout=30)
    done = wait_for(lambda: (s := status(sandbox, "j1"))["state"] != "running" and s,
                    "the relaunched job to end", timeout=600)
    assert done["state"] == "finished", done
    assert done["trainer"]["start_step"] == stop_step
    got = losses(inventory, "j1", tmp_path)
    assert sorted(got) == list(range(1, 31))
    for step, loss in expected.items():
        assert abs(got[step] - loss) < 1e-6, (step, got[step], loss)


def test_a_killed_rank_restarts_or_fails_naming_it(sandbox_cluster, node_ssh, tmp_path,
                                                   cleanup, one_node_inventory):
    one = Sandbox(one_node_inventory, sandbox_cluster.nodes)
    sandbox = Sandbox(sandbox_cluster.inventory_path, sandbox_cluster.nodes)
    node1_ip = dict(sandbox_cluster.nodes)["node1"]
    node2_ip = dict(sandbox_cluster.nodes)["node2"]
    cfg = config(tmp_path, steps=24, interval=2)
    cleanup.extend(["rs", "nr"])
    # With restarts: the job resumes from its newest checkpoint and finishes.
    # (On node1 alone: its checkpoints are on its own disk.)
    cli(one, "train", "--config", str(cfg), "--name", "rs", "--detach", "--fresh",
        "--yes", "--max-restarts", "2")
    wait_for(lambda: (status(one, "rs")["checkpoint"] or {}).get("step", 0) >= 2,
             "a checkpoint")
    pids = node_ssh(node1_ip, RANK_PIDS.format(name="rs")).stdout.split()
    assert pids, "no rank of job rs on node1"
    node_ssh(node1_ip, f"kill -9 {' '.join(pids)}")
    done = wait_for(lambda: (s := status(one, "rs"))["state"] != "running" and s,
                    "job rs to end", timeout=600)
    assert done["state"] == "finished", done
    assert done["trainer"]["restarts"] >= 1
    assert done["trainer"]["step"] == 24

    # Without: the job fails, naming the node and the rank, and nothing is left.
    cli(sandbox, "train", "--config", str(config(tmp_path, 100000, 0, "long")),
        "--name", "nr", "--detach", "--fresh", "--yes")
    wait_for(lambda: (status(sandbox, "nr")["trainer"] or {}).get("step", 0) >= 2,
             "step 2 of job nr")
    pids = node_ssh(node2_ip, RANK_PIDS.format(name="nr")).stdout.split()
    node_ssh(node2_ip, f"kill -9 {' '.join(pids)}")
    done = wait_for(lambda: (s := status(sandbox, "nr"))["state"] != "running" and s,
                    "job nr to end", timeout=180)
    assert done["state"] == "failed", done
    assert done["culprit"].startswith("rank ") and done["culprit"].endswith(" on node2"), done
    assert left_on_nodes(sandbox, node_ssh, "nr") == {}


# The files of a node that a restarted sandbox node gets back from the sandbox: kept here
# and put back, as another test of the session may have changed them (bootstrap).
RESTARTED_FILES = ("/etc/hosts", "/root/.ssh/authorized_keys")


def test_a_stopped_node_ends_the_job_within_60_s_naming_it(sandbox_cluster, node_ssh,
                                                           tmp_path, cleanup):
    from dsk_provision import sandbox as sandboxes

    sandbox = Sandbox(sandbox_cluster.inventory_path, sandbox_cluster.nodes)
    ips = dict(sandbox_cluster.nodes)
    victim = "node3"
    cleanup.append("nd")
    cli(sandbox, "train", "--config", str(config(tmp_path, 100000, 0, "long")), "--name",
        "nd", "--detach", "--fresh", "--yes", "--max-restarts", "1",
        env={WATCH_VAR: "2:12"})  # shorter node-watch times than the default 5:30
    wait_for(lambda: (status(sandbox, "nd")["trainer"] or {}).get("step", 0) >= 2,
             "step 2 of job nd")
    kept = {path: node_ssh(ips[victim], f"base64 -w0 {path}").stdout.strip()
            for path in RESTARTED_FILES}

    def victim_running() -> bool:
        rows = sandboxes.status(sandbox_cluster.name)
        return any(n["name"] == victim and n["state"] == "running" for n in rows[0]["nodes"])

    try:
        stopped = time.time()
        sandboxes.stop_node(sandbox_cluster.name, victim)
        done = wait_for(lambda: (s := status(sandbox, "nd"))["state"] != "running" and s,
                        "job nd to end", timeout=180)
    finally:
        if not victim_running():
            sandboxes.up(sandbox_cluster.name, len(sandbox_cluster.nodes))
        for path, text in kept.items():
            node_ssh(ips[victim], f"echo {text} | base64 -d > {path}")
    assert done["state"] == "failed" and done["culprit"] == f"{victim} (lost)", done
    survivors = [n for n in done["nodes"] if n["node"] != victim]
    for view in survivors:
        assert view["lost_node"] == victim and view["state"] == "failed", view
        assert view["ended"] - stopped < 60, (view["ended"] - stopped, view)
        assert view["reason"].startswith(f"node {victim} stopped answering"), view
    shown = cli(sandbox, "jobs", "status", "nd", check=False)
    text = " ".join(shown.stdout.split())
    assert f"job nd: failed ({victim} (lost))" in text, shown.stdout
    assert f"dsk-provision nodes cordon -i INVENTORY {victim} --reason" in text, text
    assert left_on_nodes(sandbox, node_ssh, "nd") == {}


def test_a_rank_killed_during_a_save_resumes_from_the_previous_checkpoint(
        sandbox_cluster, node_ssh, tmp_path, cleanup, one_node_inventory):
    from dsk_provision.joblaunch import start_job
    from trainer.resilience import SAVE_PAUSE_VAR

    one = Sandbox(one_node_inventory, sandbox_cluster.nodes)
    inventory = load_inventory(one_node_inventory).in_service()
    node1_ip = dict(sandbox_cluster.nodes)["node1"]
    cfg = config(tmp_path, steps=12, interval=3)
    cleanup.append("ck")
    # The save of step 6 pauses on node1 once its shards are written, before COMPLETE.
    start_job(inventory, cfg, "ck", fresh=True, env={SAVE_PAUSE_VAR: "node1:6:300"})
    jd = inventory.nodes[0].settings.job_dir("ck")
    wait_for(lambda: node_ssh(node1_ip, f"grep -q 'drill: pausing' {jd}/logs/rank-0.log",
                              check=False).returncode == 0, "the save of step 6")
    listing = node_ssh(node1_ip, f"ls -A {jd}/checkpoints/step-000003 "
                                 f"{jd}/checkpoints/step-000006").stdout.split()
    assert "COMPLETE" in listing[:listing.index(f"{jd}/checkpoints/step-000006:")], listing
    assert "COMPLETE" not in listing[listing.index(f"{jd}/checkpoints/step-000006:"):]
    assert ".metadata" in listing, listing  # the save was under way: its shards are there
    pids = node_ssh(node1_ip, RANK_PIDS.format(name="ck")).stdout.split()
    assert pids, "no rank of job ck on node1"
    node_ssh(node1_ip, f"kill -9 {' '.join(pids)}")
    failed = wait_for(lambda: (s := status(one, "ck"))["state"] != "running" and s,
                      "job ck to end", timeout=120)
    assert failed["state"] == "failed" and failed["checkpoint"]["step"] == 3, failed

    # The next launch (no pause) resumes from step 3, the newest complete checkpoint.
    cli(one, "train", "--config", str(cfg), "--name", "ck", "--detach")
    done = wait_for(lambda: (s := status(one, "ck"))["state"] != "running" and s,
                    "job ck to finish", timeout=300)
    assert done["state"] == "finished" and done["trainer"]["step"] == 12, done
    assert done["trainer"]["start_step"] == 3, done
    log = node_ssh(node1_ip, f"cat {jd}/logs/rank-0.log").stdout
    assert f"resumed from {jd}/checkpoints/step-000003" in log, log[-2000:]
