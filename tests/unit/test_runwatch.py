"""How a playbook run ends when it does not end by itself: the idle timeout, SIGINT,
SIGTERM and SIGHUP (dsk_provision.runwatch, used by dsk_provision.runner), and the ssh
keep-alives that make a dead node unreachable instead of a hang.

The real runs use ansible-runner against localhost (local connection) with
fixtures/runner_hang.yml, whose only task sleeps with a helper that left its process group.
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
import yaml
from rich.console import Console

from dsk_provision import runwatch, ssh_options
from dsk_provision.errors import InputError, Interrupted, RunFailed
from dsk_provision.inventory import load_inventory
from dsk_provision.runner import run_playbook

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HANG = str(HERE / "fixtures" / "runner_hang.yml")

pytestmark = pytest.mark.timeout(240)


def _inventory(tmp_path: Path, extra: dict | None = None) -> Path:
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_gpus_per_node": 0, "dsk_cluster_name": "unit",
                 "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "ansible_remote_tmp": f"{tmp_path}/remote-tmp",
                 "ansible_control_path_dir": f"{tmp_path}/cp", "dsk_test_dir": str(tmp_path),
                 **(extra or {})},
        "children": {"nodes": {"hosts": {"localhost": {"ansible_host": "127.0.0.1"}}}}}}))
    return inv


def _pid_alive(pid: int) -> bool:
    """Independent of runwatch: /proc says the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _children_tree(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rfind(")") + 2:].split()[1])
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        out.update(kids)
        todo += kids
    return out


def _wait_for(path: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        time.sleep(0.1)
    pytest.fail(f"{path} never appeared")


def _wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _pid_alive(p)]


def _kill_leftovers(tmp_path: Path) -> None:
    """A failing test must not leave its sleepers behind (only ours, by recorded PID)."""
    for name in ("sleeper.pid", "escaped.pid"):
        f = tmp_path / name
        if f.exists():
            pid = int(f.read_text())
            if _pid_alive(pid) and "sleep" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- idle timeout

def test_idle_timeout_fires_only_after_a_silence_longer_than_the_timeout():
    now = [0.0]
    watch = runwatch.RunWatch(30, clock=lambda: now[0])
    for t in (5, 20, 45, 70, 99):  # events at most 29 s apart
        now[0] = t
        assert not watch.cancel_requested()
        watch.note_event()
    now[0] = 99 + 30  # exactly the timeout: not yet
    assert not watch.cancel_requested()
    now[0] = 99 + 30.5
    assert watch.cancel_requested() and watch.idle_expired and watch.signum is None
    watch.note_event()  # a late event does not undo a cancel already decided
    assert watch.cancel_requested()


def test_idle_timeout_setting(monkeypatch):
    monkeypatch.delenv(runwatch.IDLE_TIMEOUT_ENV, raising=False)
    assert runwatch.idle_timeout_s() == runwatch.IDLE_TIMEOUT_S
    monkeypatch.setenv(runwatch.IDLE_TIMEOUT_ENV, "90")
    assert runwatch.idle_timeout_s() == 90.0
    assert runwatch.idle_timeout_s(5) == 5.0
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(runwatch.IDLE_TIMEOUT_ENV, bad)
        with pytest.raises(InputError, match=runwatch.IDLE_TIMEOUT_ENV):
            runwatch.idle_timeout_s()


def test_a_silent_playbook_is_stopped_after_the_idle_timeout(tmp_path):
    inv = load_inventory(_inventory(tmp_path))
    console = Console(file=(tmp_path / "console.txt").open("w"), width=120)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    try:
        with pytest.raises(RunFailed) as err:
            run_playbook(HANG, inv, command="unit", runs_dir=tmp_path / "runs",
                         console=console, idle_timeout=4)
    finally:
        console.file.close()
        _kill_leftovers(tmp_path)
    assert time.monotonic() - started < 60  # the task alone would sleep 300 s
    assert "no event from ansible-playbook for 4 s" in str(err.value)
    assert "localhost (Sleep for a long time, silently)" in str(err.value)
    assert err.value.nodes == ["localhost"]
    recap = json.loads(next((tmp_path / "runs").glob("*-unit/recap.json")).read_text())
    assert recap["state"] == "timed out" and recap["signal"] is None
    assert recap["running"] == {"localhost": "Sleep for a long time, silently"}
    pids = [int((tmp_path / n).read_text()) for n in ("sleeper.pid", "escaped.pid")]
    assert not _wait_gone(pids), "the task's processes outlived the run"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are the run's only
    _payload_left_in_the_run(tmp_path)


def _payload_left_in_the_run(tmp_path: Path) -> None:
    """The killed task's module unpacked itself into the run's own temp directory (the
    run's TMPDIR), where its files stay with the run's record instead of in the system's
    temp. A module unpacks once, so there is none of it in the system's temp."""
    left = list((tmp_path / "runs").glob("*-unit/ansible/tmp/ansible_*_payload_*"))
    assert [p.name.split("_payload_")[0] for p in left] == ["ansible_ansible.legacy.command"]


# --------------------------------------------------------------------------- signals

def test_a_signal_during_the_run_is_caught_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in runwatch.STOP_SIGNALS}
    watch = runwatch.RunWatch(3600)
    with watch:
        assert not watch.cancel_requested()
        os.kill(os.getpid(), signal.SIGHUP)  # would end this process without the handler
        deadline = time.monotonic() + 5
        while watch.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.cancel_requested() and watch.signal_name == "SIGHUP"
    assert {s: signal.getsignal(s) for s in runwatch.STOP_SIGNALS} == before


def test_reap_stops_recorded_processes_outside_the_killed_group(tmp_path):
    """A descendant that left the process group (setsid) survives ansible-runner's group
    kill; the watch records it before the cancel and stops it by PID."""
    child = subprocess.Popen(["setsid", "sleep", "300"])
    try:
        watch = runwatch.RunWatch(0.01)
        time.sleep(0.05)
        assert watch.cancel_requested()
        assert child.pid in {p.pid for p in watch.recorded}
        stopped = watch.reap()
        assert child.pid in {p.pid for p in stopped}
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


_DRIVER = """
import sys
from pathlib import Path
from dsk_provision.errors import DskError
from dsk_provision.inventory import load_inventory
from dsk_provision.runner import run_playbook
try:
    run_playbook(sys.argv[1], load_inventory(sys.argv[2]), command="unit",
                 runs_dir=Path(sys.argv[3]))
except DskError as exc:
    print(f"error: {exc}", flush=True)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_a_signal_stops_the_playbook_writes_the_recap_and_exits_128_plus_it(tmp_path, sig):
    inv = _inventory(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, HANG, str(inv),
                             str(tmp_path / "runs")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        sleeper = int(_wait_for(tmp_path / "sleeper.pid"))
        escaped = int(_wait_for(tmp_path / "escaped.pid"))
        tree = _children_tree(proc.pid)  # ansible-playbook, its workers, the task
        assert sleeper in tree and escaped in tree
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _kill_leftovers(tmp_path)
    assert proc.returncode == Interrupted(sig).exit_code == 128 + sig, out
    assert f"interrupted by {sig.name}: stopped ansible-playbook" in out
    assert not _wait_gone(sorted(tree)), "processes of the run outlived it"
    recap = json.loads(next((tmp_path / "runs").glob("*-unit/recap.json")).read_text())
    assert recap["state"] == "interrupted" and recap["signal"] == sig.name
    assert recap["running"] == {"localhost": "Sleep for a long time, silently"}
    log = next((tmp_path / "runs").glob("*-unit/hosts/localhost.log")).read_text()
    assert f"interrupted by {sig.name}" in log
    _payload_left_in_the_run(tmp_path)


def test_exit_codes_of_signals():
    assert [Interrupted(s).exit_code for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] \
        == [130, 143, 129]


# --------------------------------------------------------------------------- keep-alives

def test_ansible_and_the_launcher_use_the_same_keepalives_and_connect_timeout(tmp_path):
    """Ansible's ssh command line carries ServerAliveInterval/CountMax (a dead node becomes
    unreachable) and the launcher's ssh carries the same values, read from one place."""
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: nodes\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.copy:\n"
        "        content: \"{{ lookup('ansible.builtin.config', 'ssh_args', "
        "plugin_type='connection', plugin_name='ssh') }}\\n"
        "{{ lookup('ansible.builtin.config', 'DEFAULT_TIMEOUT') }}\"\n"
        "        dest: \"{{ dsk_test_dir }}/ssh.txt\"\n")
    console = Console(file=(tmp_path / "console.txt").open("w"), width=120)
    result = run_playbook(str(play), load_inventory(_inventory(tmp_path)), command="unit",
                          runs_dir=tmp_path / "runs", console=console)
    console.file.close()
    assert result.ok
    ansible_args, ansible_timeout = (tmp_path / "ssh.txt").read_text().splitlines()
    parsed = {key: values[0] for key, values, _ in ssh_options.parse_args(ansible_args).options}
    interval, count = int(parsed["serveraliveinterval"]), int(parsed["serveralivecountmax"])
    assert 0 < interval * count <= 60  # a dead node is noticed well within two minutes
    assert "stricthostkeychecking" not in parsed  # pinning comes from the inventory

    from dsk_provision.remote import SshTransport

    key = tmp_path / "id"
    key.write_text("k")
    key.chmod(0o600)
    (tmp_path / "launch").mkdir()
    inv = load_inventory(_inventory(tmp_path / "launch", {
        "ansible_connection": "ssh", "ansible_ssh_private_key_file": str(key)}))
    argv = SshTransport(inv).argv(inv.nodes[0], "true")
    assert f"ServerAliveInterval={interval}" in argv
    assert f"ServerAliveCountMax={count}" in argv
    assert f"ConnectTimeout={ansible_timeout}" in argv
    assert "StrictHostKeyChecking=yes" in argv
