"""One run per cluster: the lock in the cluster's state directory, held by another process."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dsk_provision import lock
from dsk_provision.cli import app
from dsk_provision.errors import ClusterBusy
from dsk_provision.inventory import load_inventory
from dsk_provision.state import STATE_DIR_ENV

REPO = Path(__file__).resolve().parents[2]
_HOLDER = """
import sys
from dsk_provision.lock import cluster_lock
with cluster_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder():
    """holder(cluster, command) -> a process holding the cluster's lock until killed."""
    procs: list[subprocess.Popen] = []

    def start(cluster: str, command: str = "bootstrap") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, cluster, command],
                                env=dict(os.environ, PYTHONPATH=str(REPO)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_state_dir_is_private_to_the_test_session():
    assert os.environ.get(STATE_DIR_ENV), "tests/conftest.py sets it for the session"
    assert not Path(os.environ[STATE_DIR_ENV]).resolve().is_relative_to(Path.home() / ".local")


def test_a_second_process_is_refused_with_the_holders_details(holder):
    first = holder("alpha", "bootstrap")
    with pytest.raises(ClusterBusy) as err:
        with lock.cluster_lock("alpha", "validate"):
            pytest.fail("took a lock another process holds")
    message = str(err.value)
    for detail in (f"pid {first.pid}", f"{getpass.getuser()}@{socket.gethostname()}",
                   "`bootstrap`", "cluster alpha is busy", "started 20"):
        assert detail in message
    assert err.value.exit_code == 75
    holder_doc = json.loads(lock.lock_path("alpha").read_text())
    assert holder_doc["pid"] == first.pid and holder_doc["command"] == "bootstrap"
    assert oct(lock.lock_path("alpha").stat().st_mode & 0o777) == "0o600"


def test_the_lock_is_per_cluster_and_released_when_the_holder_dies(holder):
    first = holder("beta")
    with lock.cluster_lock("gamma", "bootstrap"):  # another cluster: free
        pass
    first.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel releases it
    first.wait()
    with lock.cluster_lock("beta", "bootstrap") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert path.read_text() == ""  # no stale details once released


def test_the_lock_is_reentrant_within_one_process(holder):
    with lock.cluster_lock("delta", "validate"):
        with lock.cluster_lock("delta", "validate-playbook"):
            pass
        # still held after the inner block: another process is refused
        proc = subprocess.run([sys.executable, "-c", _HOLDER, "delta", "x"],
                              env=dict(os.environ, PYTHONPATH=str(REPO)),
                              input="", capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "ClusterBusy" in proc.stderr
        assert "`validate`" in proc.stderr


def _inventory(tmp_path: Path, cluster: str) -> Path:
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_gpus_per_node": 0, "dsk_cluster_name": cluster,
                 "ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "children": {"nodes": {"hosts": {"localhost": {"ansible_host": "127.0.0.1"}}}}}}))
    return inv


def test_bootstrap_validate_and_train_are_refused_while_another_run_holds_the_lock(
        holder, tmp_path):
    inv = _inventory(tmp_path, "epsilon")
    first = holder("epsilon", "bootstrap")
    runs = tmp_path / "runs"
    for args in (["bootstrap", "-i", str(inv)], ["validate", "-i", str(inv)],
                 ["train", "-i", str(inv), "--config", str(REPO / "trainer/configs/tiny.toml")]):
        result = CliRunner().invoke(app, ["--runs-dir", str(runs), *args])
        assert result.exit_code == 75, result.output
        assert f"cluster epsilon is busy: `bootstrap` (pid {first.pid}" in result.output
    assert not runs.exists() or not any(runs.iterdir())  # refused before any run started


def test_check_does_not_take_the_lock(holder, tmp_path):
    inv = _inventory(tmp_path, "zeta")
    holder("zeta")
    result = CliRunner().invoke(app, ["check", "-i", str(inv)])
    assert result.exit_code == 0, result.output


def test_run_playbook_holds_the_lock_of_the_inventorys_cluster(tmp_path, monkeypatch):
    """What a second run sees while a playbook runs: the lock taken in run_playbook."""
    from dsk_provision import runner

    inv = load_inventory(_inventory(tmp_path, "eta"))
    seen = {}

    def fake_run(*_args, **_kwargs):
        seen["holder"] = json.loads(lock.lock_path("eta").read_text())
        raise SystemExit(0)

    monkeypatch.setattr(runner, "_run_locked", fake_run)
    with pytest.raises(SystemExit):
        runner.run_playbook(str(REPO / "playbooks/site.yml"), inv, command="bootstrap",
                            runs_dir=tmp_path / "runs")
    assert seen["holder"]["command"] == "bootstrap" and seen["holder"]["pid"] == os.getpid()


def test_check_mode_before_the_first_run_makes_no_state_directory(tmp_path, monkeypatch):
    """bootstrap --check before any real run writes nothing on the control node's state
    (no lock either); a real run then takes the lock, and a later check run too."""
    from rich.console import Console

    from dsk_provision.runner import run_playbook

    state = tmp_path / "state"
    monkeypatch.setenv(STATE_DIR_ENV, str(state))
    play = tmp_path / "play.yml"
    play.write_text("- hosts: nodes\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.command: 'true'\n      changed_when: false\n")
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv/hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_gpus_per_node": 0, "ansible_connection": "local",
                 "ansible_python_interpreter": sys.executable,
                 "ansible_remote_tmp": f"{tmp_path}/remote-tmp"},
        "children": {"nodes": {"hosts": {"localhost": {"ansible_host": "127.0.0.1"}}}}}}))
    inv = load_inventory(tmp_path / "inv")
    console = Console(file=(tmp_path / "console.txt").open("w"), width=120)
    seen = []
    real = lock.cluster_lock

    def spy(cluster, command):
        seen.append(command)
        return real(cluster, command)
    monkeypatch.setattr("dsk_provision.runner.cluster_lock", spy)
    assert run_playbook(str(play), inv, command="unit", runs_dir=tmp_path / "runs",
                        console=console, check=True).ok
    assert not state.exists() and seen == []
    assert run_playbook(str(play), inv, command="unit", runs_dir=tmp_path / "runs",
                        console=console).ok
    assert (state / inv.cluster_name / lock.LOCK_FILE).exists() and seen == ["unit"]
    assert run_playbook(str(play), inv, command="unit", runs_dir=tmp_path / "runs",
                        console=console, check=True).ok
    assert seen == ["unit", "unit"]
    console.file.close()
