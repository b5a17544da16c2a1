"""Fault drills on the session sandbox: a node that dies mid-bootstrap, SIGINT and SIGTERM
during a bootstrap, and a second bootstrap started while one runs (during the SIGINT
drill's bootstrap, so that no extra bootstrap is needed for it).

Each drill runs `dsk-provision bootstrap` as a user would (the CLI, in its own session so
that only the signals the test sends reach it) on the already bootstrapped sandbox, and
leaves the sandbox as it found it: a stopped node is started again even when the test
fails, and every drill ends with a bootstrap that converges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXE = Path(sys.prefix) / "bin" / "dsk-provision"
VICTIM = "node3"
# What Ansible runs on a node for each module with pipelining (the wrapper's command line).
MODULE_WRAPPER = "&& sleep 0"
# Where the roles write; a `.ansible_tmp*` file there is a write cut in half (Ansible
# writes a temporary file beside the destination, then renames it).
MANAGED_ROOTS = "/etc /opt /usr/local /root /var/lib/dsk"


def _start(runs: Path, inventory: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    runs.mkdir(parents=True, exist_ok=True)
    log = runs.parent / f"{runs.name}.out"
    env = dict(os.environ, DSK_RUNS_DIR=str(runs), DSK_PLAIN_PROGRESS="1")
    proc = subprocess.Popen([str(EXE), "bootstrap", "-i", str(inventory), *args], cwd=REPO,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log


def _bootstrap(runs: Path, inventory: Path, timeout: float = 600) -> tuple[int, str, dict]:
    proc, log = _start(runs, inventory)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    return rc, log.read_text(), _recap(runs)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _recap(runs: Path) -> dict:
    recaps = sorted(runs.glob("*-bootstrap*/recap.json"))
    return json.loads(recaps[-1].read_text()) if recaps else {}


def _wait_for_results(runs: Path, host: str, count: int, proc, timeout: float = 300) -> None:
    """Until ``host`` has ``count`` task results in the running bootstrap's host log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(runs.glob(f"*-bootstrap*/hosts/{host}.log"))
        if logs:
            lines = [ln for ln in logs[0].read_text().splitlines() if ln[:2].isdigit()]
            if len(lines) >= count:
                return
        time.sleep(0.2)
    pytest.fail(f"the bootstrap never reached {count} results on {host} "
                f"(exit code {proc.poll()})")


def _tree(root: int) -> dict[int, str]:
    """pid -> start time of every process below ``root`` (read from /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            fields = text[text.rfind(")") + 2:].split()
            stats[int(entry.name)] = (int(fields[1]), fields[19])
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start) in stats.items():
            if ppid == parent and pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


def _still_running(procs: dict[int, str]) -> list[str]:
    left = []
    for pid, start in procs.items():
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if fields[19] == start and fields[0] not in "ZX":
            left.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')}")
    return left


@pytest.fixture
def cluster(bootstrapped_cluster):
    bootstrapped_cluster.require_success()
    return bootstrapped_cluster.info


def test_a_node_that_dies_mid_bootstrap_is_named_unreachable_and_the_others_finish(
        cluster, tmp_path):
    from dsk_provision import sandbox

    def node_running() -> bool:
        rows = sandbox.status(cluster.name)
        return any(n["name"] == VICTIM and n["state"] == "running" for n in rows[0]["nodes"])

    runs = tmp_path / "dead"
    proc, log = _start(runs, cluster.inventory_path)
    try:
        _wait_for_results(runs, VICTIM, 2, proc)  # facts gathered, roles under way
        stopped = time.monotonic()
        sandbox.stop_node(cluster.name, VICTIM)
        assert not node_running()
        rc = proc.wait(timeout=240)
        took = time.monotonic() - stopped
    finally:
        _kill(proc)
        if not node_running():
            sandbox.up(cluster.name, len(cluster.nodes))  # the drill leaves it as it was
    out = log.read_text()
    recap = _recap(runs)
    assert rc == 1, out[-3000:]
    assert took < 120, f"the run took {took:.0f} s to end after {VICTIM} died"
    assert list(recap["unreachable"]) == [VICTIM], out[-3000:]
    assert f"{VICTIM}: unreachable" in out
    assert recap["state"] == "finished"  # ended by itself: neither cancelled nor timed out
    for name, _ip in cluster.nodes:
        if name != VICTIM:
            counts = recap["recap"][name]
            assert counts["failed"] == 0 and counts["unreachable"] == 0, recap["recap"]
            assert counts["ok"] > 10, recap["recap"]  # the whole play, not a stub of it
    print(f"{VICTIM} died; the run ended {took:.0f} s later")

    clock = time.monotonic()
    rc, out, recap = _bootstrap(tmp_path / "converge", cluster.inventory_path)
    assert rc == 0, out[-3000:]
    print(f"converging bootstrap: {time.monotonic() - clock:.0f} s")
    rc, out, recap = _bootstrap(tmp_path / "again", cluster.inventory_path)
    assert rc == 0, out[-3000:]
    changed = {h: c["changed"] for h, c in recap["recap"].items()}
    assert sorted(changed) == sorted(n for n, _ in cluster.nodes)
    assert not any(changed.values()), changed


def _node_leftovers(node_ssh, ip: str) -> str:
    """Ansible module processes still running on a node, half-written files in the
    managed paths, and packages dpkg left half-installed: empty when there are none."""
    script = (f"pgrep -af -- '{MODULE_WRAPPER}' | grep -v pgrep; "
              f"find {MANAGED_ROOTS} -xdev -name '.ansible_tmp*' 2>/dev/null; "
              "dpkg --audit; true")
    return node_ssh(ip, script).stdout.strip()


def _second_bootstrap_is_refused(cluster, first: subprocess.Popen, runs: Path) -> None:
    """Drill: a second bootstrap while ``first`` runs is refused at once, naming it."""
    from dsk_provision.lock import lock_path

    started = time.monotonic()
    second = subprocess.run([str(EXE), "bootstrap", "-i", str(cluster.inventory_path)],
                            cwd=REPO, env=dict(os.environ, DSK_RUNS_DIR=str(runs)),
                            capture_output=True, text=True, timeout=60)
    refused_in = time.monotonic() - started
    message = second.stdout + second.stderr
    assert second.returncode == 75, message
    assert refused_in < 15
    assert f"cluster {cluster.name} is busy: `bootstrap` (pid {first.pid}" in message
    assert json.loads(lock_path(cluster.name).read_text())["pid"] == first.pid
    assert not runs.exists() or not any(runs.iterdir())  # no run was started
    assert first.poll() is None  # the first run goes on


def _interrupt(cluster, runs: Path, node_ssh, sig: signal.Signals, *,
               also=None) -> None:
    """Drill: ``sig`` during a bootstrap stops everything it started and leaves a recap.
    ``also(first_process)`` runs while the bootstrap is under way, before the signal."""
    proc, log = _start(runs, cluster.inventory_path)
    try:
        _wait_for_results(runs, VICTIM, 3, proc)
        if also is not None:
            also(proc)
        tree = _tree(proc.pid)  # ansible-playbook, its workers, their ssh clients
        assert any("ansible-playbook" in Path(f"/proc/{p}/cmdline").read_text()
                   for p in tree if Path(f"/proc/{p}").exists()), "no ansible-playbook?"
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=60)
    finally:
        _kill(proc)
    out = log.read_text()
    assert rc == 128 + sig, out[-3000:]
    assert f"interrupted by {sig.name}" in out
    recap = _recap(runs)
    assert recap["state"] == "interrupted" and recap["signal"] == sig.name
    assert sorted(recap["recap"]) == sorted(n for n, _ in cluster.nodes)
    assert _still_running(tree) == [], "processes of the run outlived it on the control node"

    # A module already running on a node finishes (or dies writing its result to the
    # closed channel); none may stay, and none may leave a file half-written.
    deadline = time.monotonic() + 90
    left = {}
    while time.monotonic() < deadline:
        left = {name: text for name, ip in cluster.nodes
                if (text := _node_leftovers(node_ssh, ip))}
        if not left:
            break
        time.sleep(2)
    assert not left, left


def test_signals_and_a_second_bootstrap_during_a_bootstrap(cluster, tmp_path, node_ssh):
    """SIGINT and SIGTERM during a bootstrap, then a bootstrap that converges; while the
    first one runs, a second bootstrap is refused naming it. (One test, so that the
    drills share the converging bootstrap at the end.)"""
    clock = time.monotonic()
    _interrupt(cluster, tmp_path / "sigint", node_ssh, signal.SIGINT,
               also=lambda first: _second_bootstrap_is_refused(cluster, first,
                                                               tmp_path / "second"))
    print(f"SIGINT drill and the refused second bootstrap: {time.monotonic() - clock:.0f} s")
    clock = time.monotonic()
    _interrupt(cluster, tmp_path / "sigterm", node_ssh, signal.SIGTERM)
    print(f"SIGTERM drill: {time.monotonic() - clock:.0f} s")
    clock = time.monotonic()
    rc, out, recap = _bootstrap(tmp_path / "converge", cluster.inventory_path)
    assert rc == 0, out[-3000:]
    print(f"converging bootstrap: {time.monotonic() - clock:.0f} s")
