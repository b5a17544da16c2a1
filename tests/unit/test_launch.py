"""launch.py: SSH command lines, torchrun lines, environment, and fail fast without a sandbox."""

from __future__ import annotations

import shlex
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import free_port

from dsk_provision import joblaunch, launch, remote
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.inventory import Inventory, Node


def make_inventory(tmp_path: Path, nodes: list[tuple[str, str, dict]], **all_vars) -> Inventory:
    base = {"dsk_root": "/opt/dsk", "dsk_python": "/opt/dsk/venv/bin/python",
            "dsk_rdzv_port": 29500, "ansible_user": "root", **all_vars}
    built = [Node(name=name, address=addr, port=22, user=base.get("ansible_user"),
                  gpus=int(v.get("dsk_gpus", base.get("dsk_gpus_per_node", 0))),
                  vars={**base, **v})
             for name, addr, v in nodes]
    hosts = tmp_path / "hosts.yml"
    return Inventory(path=hosts, nodes=built, vars=base, hosts_file=hosts)


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "id_ed25519"
    path.write_text("not a real key\n")
    path.chmod(0o600)
    return path


def three_nodes(tmp_path, key, **extra):
    common = f"-o UserKnownHostsFile={tmp_path}/known_hosts -o StrictHostKeyChecking=yes"
    return make_inventory(tmp_path, [("node1", "10.213.7.11", {}),
                                     ("node2", "10.213.7.12", {}),
                                     ("node3", "10.213.7.13", {})],
                          ansible_ssh_private_key_file=str(key),
                          ansible_ssh_common_args=common, dsk_socket_ifname="eth0", **extra)


def test_ssh_argv_uses_inventory_and_pins_host_keys(tmp_path, key):
    inv = three_nodes(tmp_path, key)
    argv = remote.SshTransport(inv).argv(inv.nodes[1], "hostname")
    assert argv[0] == "ssh"
    assert argv[-2:] == ["10.213.7.12", "hostname"]
    joined = " ".join(argv)
    assert f"-o UserKnownHostsFile={tmp_path}/known_hosts" in joined
    assert "-o StrictHostKeyChecking=yes" in joined
    assert "StrictHostKeyChecking=no" not in joined
    assert "-o BatchMode=yes" in joined
    assert argv[argv.index("-i") + 1] == str(key)
    assert argv[argv.index("-p") + 1] == "22"
    assert argv[argv.index("-l") + 1] == "root"


def test_ssh_argv_adds_strict_checking_when_absent(tmp_path, key):
    inv = make_inventory(tmp_path, [("node1", "10.0.0.1", {"ansible_port": 2222})],
                         ansible_ssh_private_key_file=str(key))
    argv = remote.SshTransport(inv).argv(inv.nodes[0], "true")
    assert "StrictHostKeyChecking=yes" in argv


@pytest.mark.parametrize("common", [
    "-o StrictHostKeyChecking=no",
    "-oStrictHostKeyChecking=no",
    "-o 'StrictHostKeyChecking accept-new'",
    "-o UserKnownHostsFile=/dev/null",
])
def test_ssh_refuses_unpinned_host_keys(tmp_path, key, common):
    inv = make_inventory(tmp_path, [("node1", "10.0.0.1", {})],
                         ansible_ssh_private_key_file=str(key), ansible_ssh_common_args=common)
    with pytest.raises(InputError) as err:
        remote.SshTransport(inv).argv(inv.nodes[0], "true")
    assert "ansible_ssh_common_args" in str(err.value)
    assert str(inv.path) in str(err.value)


def test_missing_key_names_field_and_file(tmp_path):
    inv = make_inventory(tmp_path, [("node1", "10.0.0.1", {})],
                         ansible_ssh_private_key_file=str(tmp_path / "nope"))
    with pytest.raises(InputError) as err:
        remote.SshTransport(inv).argv(inv.nodes[0], "true")
    assert "ansible_ssh_private_key_file" in str(err.value)


def test_torchrun_argv_per_node(tmp_path, key):
    inv = three_nodes(tmp_path, key)
    argv = launch.torchrun_argv(inv, 2, "trainer.train", ["--config", "c.toml"],
                                run_id="20260101-000000-train")
    assert argv[:3] == ["/opt/dsk/venv/bin/python", "-m", "torch.distributed.run"]

    def opt(name):
        return argv[argv.index(name) + 1]

    assert opt("--nnodes") == "3"
    assert opt("--nproc_per_node") == "1"  # CPU node
    assert "--node_rank" not in argv  # c10d assigns node ranks; torchrun warns otherwise
    assert opt("--rdzv_backend") == "c10d"
    assert opt("--rdzv_endpoint") == "10.213.7.11:29500"
    assert opt("--rdzv_id") == "20260101-000000-train"
    assert argv[-4:] == ["-m", "trainer.train", "--config", "c.toml"]


def test_nproc_defaults_to_gpus_and_override(tmp_path):
    inv = make_inventory(tmp_path, [("g1", "10.0.0.1", {"dsk_gpus": 8}),
                                    ("g2", "10.0.0.2", {"dsk_gpus": 4})])
    assert launch.torchrun_argv(inv, 0, "m", [], run_id="r")[6] == "8"
    assert launch.torchrun_argv(inv, 1, "m", [], run_id="r")[6] == "4"
    assert launch.torchrun_argv(inv, 1, "m", [], run_id="r", nproc_per_node=2)[6] == "2"


def test_env_has_pythonpath_ifname_and_nccl(tmp_path, key):
    inv = three_nodes(tmp_path, key, dsk_nccl_env={"NCCL_IB_HCA": "mlx5_0,mlx5_1",
                                                   "NCCL_DEBUG": "WARN"})
    env = launch.node_env(inv.nodes[0], {"EXTRA": "a b"}, remote_dir="/opt/dsk/runs/r1")
    assert env["PYTHONPATH"] == "/opt/dsk/runs/r1"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert env["EXTRA"] == "a b"


def test_env_takes_the_settings_defaults_and_explicit_nccl_socket(tmp_path):
    inv = make_inventory(tmp_path, [("n1", "10.0.0.1", {
        "dsk_socket_ifname": "eth0", "dsk_nccl_env": {"NCCL_SOCKET_IFNAME": "ib0"}})])
    env = launch.node_env(inv.nodes[0], remote_dir="/x")
    assert env["GLOO_SOCKET_IFNAME"] == "eth0" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    bare = Node("n2", "10.0.0.2", 22, "root", 0, {})
    assert "NCCL_SOCKET_IFNAME" not in launch.node_env(bare, remote_dir="/x")
    hosts = tmp_path / "hosts.yml"
    argv = launch.torchrun_argv(Inventory(hosts, [bare], {}, hosts), 0, "m", [], run_id="r")
    assert argv[0] == bare.settings.python == f"{bare.settings.root}/venv/bin/python"
    assert argv[argv.index("--rdzv_endpoint") + 1] == f"10.0.0.2:{bare.settings.rdzv_port}"


def test_torchrun_command_records_pid_and_quotes(tmp_path, key):
    inv = three_nodes(tmp_path, key)
    line = launch.torchrun_command(inv, 1, "trainer.train", ["--name", "a b; rm -rf /"],
                                   run_id="r1", env={"X": "1 2"})
    outer = shlex.split(line)
    # torchrun leads a session (and so a process group) of its own, whose id it records.
    assert outer[-5:-1] == ["setsid", "-w", "/bin/sh", "-c"]
    inner = outer[-1]
    assert inner.startswith("echo $$ > /opt/dsk/runs/r1/torchrun-node2.pid && exec env ")
    tokens = shlex.split(inner.split("exec env ", 1)[1])
    assert "X=1 2" in tokens
    assert "PYTHONPATH=/opt/dsk/runs/r1" in tokens
    assert "DSK_RUN_ID=r1" in tokens  # the marker that reaches torchrun's workers
    assert tokens[-1] == "a b; rm -rf /"  # one argument, not shell code


def test_stop_command_only_signals_this_runs_pid():
    node = Node("node2", "10.0.0.2", 22, "root", 0, {"dsk_root": "/opt/dsk"})
    line = launch.stop_command(node, "r1")
    assert "/opt/dsk/runs/r1/torchrun-node2.pid" in line
    assert 'kill -"$1" -- -"$g"' in line  # the process group, not only the PID
    assert "pkill" not in line and "killall" not in line


def test_bad_module_name(tmp_path):
    inv = make_inventory(tmp_path, [("n1", "10.0.0.1", {})])
    with pytest.raises(InputError, match="module"):
        launch.run_torchrun(inv, "trainer.train; reboot", [], run_dir=tmp_path / "r1",
                            transport=remote.LocalTransport())


# ---------------------------------------------------------------------- fail fast, locally

FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    # Stands in for a node's python: torchrun arguments are ignored; behaviour by name.
    import sys, time, os
    mode = os.path.basename(__file__)
    print("started", mode, os.getcwd(), flush=True)
    if mode == "fail":
        time.sleep(0.5)
        print("RuntimeError: boom", flush=True)
        print("Root Cause (first observed failure):", flush=True)
        print("  rank      : 1 (local_rank: 0)", flush=True)
        sys.exit(1)
    if mode == "victim":
        time.sleep(0.7)
        print("RuntimeError: Connection closed by peer", flush=True)
        sys.exit(1)
    if mode == "ok":
        print("done", flush=True)
        sys.exit(0)
    time.sleep(120)
""")


def local_nodes(tmp_path: Path, modes: list[str]) -> Inventory:
    nodes = []
    for i, mode in enumerate(modes, 1):
        root = tmp_path / f"node{i}"
        root.mkdir()
        fake = root / mode
        fake.write_text(FAKE_PYTHON.format(python=sys.executable))
        fake.chmod(0o755)
        nodes.append((f"node{i}", f"127.0.0.{i}", {"dsk_root": str(root), "dsk_python": str(fake),
                                                  "ansible_connection": "local"}))
    return make_inventory(tmp_path, nodes)


def test_fail_fast_stops_others_and_names_the_node(tmp_path, capsys):
    inv = local_nodes(tmp_path, ["sleep", "fail", "sleep"])
    run_dir = tmp_path / "runs" / "20260101-000000-train"
    started = time.monotonic()
    with pytest.raises(RunFailed) as err:
        launch.run_torchrun(inv, "trainer.train", ["--steps", "3"], run_dir=run_dir,
                            timeout_s=60)
    elapsed = time.monotonic() - started
    assert err.value.nodes == ["node2"]
    assert "rank 1 on node2" in str(err.value)
    assert "stopped node1, node3" in str(err.value)
    assert elapsed < 20, f"the sleeping nodes were not stopped quickly ({elapsed:.1f} s)"
    out = capsys.readouterr().out
    assert "[node2] RuntimeError: boom" in out
    assert "[node1] started sleep" in out
    assert (run_dir / "logs" / "node2.log").read_text().count("boom") == 1
    # The trainer was shipped into each node's run directory, and each wrote its PID file.
    for i in (1, 2, 3):
        remote = tmp_path / f"node{i}" / "runs" / run_dir.name
        assert (remote / "trainer" / "probes" / "allreduce.py").is_file()
        assert (remote / f"torchrun-node{i}.pid").is_file()


def test_victim_is_not_blamed(tmp_path):
    inv = local_nodes(tmp_path, ["victim", "fail"])
    with pytest.raises(RunFailed) as err:
        launch.run_torchrun(inv, "trainer.train", [], run_dir=tmp_path / "r-victim",
                            timeout_s=60)
    assert err.value.nodes == ["node2"]


def test_all_succeed_and_fetch(tmp_path):
    inv = local_nodes(tmp_path, ["ok", "ok"])
    extra = tmp_path / "cfg.toml"
    extra.write_text("x = 1\n")
    result = launch.run_torchrun(inv, "trainer.train", [], run_dir=tmp_path / "r-ok",
                                 files={"config/cfg.toml": extra}, timeout_s=60)
    assert result.exit_codes == {"node1": 0, "node2": 0}
    assert result.world_size == 2
    assert "done" in result.logs["node2"].read_text()
    shipped = Path(result.remote_dirs["node2"]) / "config" / "cfg.toml"
    got = remote.fetch(inv, "node2", shipped, tmp_path / "back" / "cfg.toml")
    assert got.read_text() == "x = 1\n"
    with pytest.raises(RunFailed) as err:
        remote.fetch(inv, "node1", "/nonexistent/file", tmp_path / "back" / "none")
    assert err.value.nodes == ["node1"]


def test_timeout_stops_everything(tmp_path):
    inv = local_nodes(tmp_path, ["sleep", "sleep"])
    with pytest.raises(RunFailed) as err:
        launch.run_torchrun(inv, "trainer.train", [], run_dir=tmp_path / "r-slow", timeout_s=1)
    assert "did not finish within 1 s" in str(err.value)
    assert sorted(err.value.nodes) == ["node1", "node2"]


# ---------------------------------------------------------------------- stopping, locally

# Stands in for torchrun: a helper in its own process group (dies with the group) and a
# worker in a session of its own, as torchrun starts its workers, which starts a child of
# its own. Every process appends its PID to ./pids. In "stubborn" mode all of them
# ignore SIGTERM.
# The job's supervisor and its helpers (python -m trainer.job) run on the real interpreter.
TO_REAL_PYTHON = """\
    if sys.argv[1:3] == ["-m", "trainer.job"]:
        os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""

FAKE_TORCHRUN = textwrap.dedent("""\
    #!{python}
    import os, signal, subprocess, sys, time
""" + TO_REAL_PYTHON + """\
    if sys.argv[1:2] == ["-"]:  # the checks before the launch: the real Python answers
        os.execv(sys.executable, [sys.executable] + sys.argv[1:])
    stubborn = os.path.basename(__file__) == "stubborn"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    def note(pid):
        with open("pids", "a") as fh:
            fh.write(f"{{pid}}\\n")
    note(os.getpid())
    ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if stubborn else ""
    helper = subprocess.Popen([sys.executable, "-c", ignore + "import time; time.sleep(300)"])
    note(helper.pid)
    worker = subprocess.Popen([sys.executable, "-c", ignore + (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        "open('pids', 'a').write(f'{{c.pid}}\\\\n'); time.sleep(300)")],
        start_new_session=True)
    note(worker.pid)
    print("ranks running", flush=True)
    time.sleep(300)
""")


def fake_torchrun_nodes(tmp_path: Path, modes: list[str]) -> Inventory:
    nodes = []
    for i, mode in enumerate(modes, 1):
        root = tmp_path / f"node{i}"
        root.mkdir()
        fake = root / mode
        fake.write_text(FAKE_TORCHRUN.format(python=sys.executable))
        fake.chmod(0o755)
        nodes.append((f"node{i}", f"127.0.0.{i}", {"dsk_root": str(root),
                                                  "dsk_python": str(fake),
                                                  "ansible_connection": "local"}))
    return make_inventory(tmp_path, nodes)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for_pids(path: Path, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.05)
    raise AssertionError(f"{path} did not list {count} processes within {timeout} s")


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def kill_left(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["obedient", "stubborn"])
def test_stop_command_ends_torchruns_group_and_its_workers_sessions(tmp_path, mode):
    # A real process tree on this machine, started by the node command line: torchrun
    # leads its own group, its worker leads a session of its own.
    inv = fake_torchrun_nodes(tmp_path, [mode])
    node = inv.nodes[0]
    run_id = "20260101-000000-stop"
    transport = remote.LocalTransport()
    client = transport.popen(node, launch.torchrun_command(inv, 0, "trainer.train", [],
                                                           run_id=run_id))
    run_dir = Path(str(launch.remote_run_dir(node, run_id)))
    pids = wait_for_pids(run_dir / "pids", 4)
    try:
        torchrun = int((run_dir / f"torchrun-{node.name}.pid").read_text())
        assert torchrun == pids[0]
        assert Path(f"/proc/{torchrun}/stat").read_text().rsplit(")", 1)[1].split()[2] \
            == str(torchrun), "torchrun does not lead its own process group"
        started = time.monotonic()
        rc, out = remote.run_command(transport, node,
                                     launch.stop_command(node, run_id, grace_s=1), timeout=30)
        assert rc == 0, out
        assert time.monotonic() - started < 30  # grace 1 s; the machine may be busy
        assert wait_gone(pids) == [], "processes of the run survived the stop"
        client.wait(timeout=10)
    finally:
        kill_left(pids)
        if client.poll() is None:
            client.kill()
            client.wait()


def test_stop_command_leaves_a_recycled_pid_alone(tmp_path):
    import subprocess

    inv = fake_torchrun_nodes(tmp_path, ["obedient"])
    node = inv.nodes[0]
    run_dir = Path(str(launch.remote_run_dir(node, "r-old")))
    run_dir.mkdir(parents=True)
    # The PID file names a process that is not this run's torchrun (a recycled PID).
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (run_dir / f"torchrun-{node.name}.pid").write_text(f"{stranger.pid}\n")
        rc, _ = remote.run_command(remote.LocalTransport(), node,
                                   launch.stop_command(node, "r-old", grace_s=1))
        assert rc == 0
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


INTERRUPT_INVENTORY = """\
all:
  vars:
    ansible_connection: local
    dsk_gpus_per_node: 0
    dsk_rdzv_port: {port}
  children:
    nodes:
      hosts:
        node1: {{ansible_host: 127.0.0.1, dsk_root: {root1}, dsk_python: {python1}}}
        node2: {{ansible_host: 127.0.0.2, dsk_root: {root2}, dsk_python: {python2}}}
"""


@pytest.mark.parametrize(("signum", "to_group", "code"), [
    ("SIGINT", True, 130),   # Ctrl-C: the terminal signals the whole foreground group
    ("SIGTERM", False, 143),
    ("SIGHUP", False, 129),
], ids=["Ctrl-C", "SIGTERM", "SIGHUP"])
def test_a_signal_to_train_stops_every_node_and_leaves_no_client(tmp_path, signum, to_group,
                                                                  code):
    import os
    import signal
    import subprocess

    fake_torchrun_nodes(tmp_path, ["obedient", "obedient"])
    hosts = tmp_path / "inventory" / "hosts.yml"
    hosts.parent.mkdir()
    port = free_port()  # the rendezvous check listens there
    hosts.write_text(INTERRUPT_INVENTORY.format(
        port=port,
        **{f"root{i}": tmp_path / f"node{i}" for i in (1, 2)},
        **{f"python{i}": tmp_path / f"node{i}" / "obedient" for i in (1, 2)}))
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), DSK_RUNS_DIR=str(tmp_path / "runs"))
    cli = subprocess.Popen([sys.executable, "-m", "dsk_provision", "train", "-i", str(hosts),
                            "--config", str(TINY)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    pids: list[int] = []
    try:
        for i in (1, 2):
            (pid_list,) = wait_for_pids_glob(tmp_path / f"node{i}" / "jobs", 4)
            pids += pid_list
        # train follows the job once every node recorded its launch: its followers start
        # a moment after the ranks
        deadline = time.monotonic() + 30
        while not (clients := children(cli.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clients, "train started no client processes"
        if to_group:
            os.killpg(cli.pid, getattr(signal, signum))
        else:
            os.kill(cli.pid, getattr(signal, signum))
        out, _ = cli.communicate(timeout=60)
        assert cli.returncode == code, out
        assert f"interrupted by {signum}; stopped trainer.train on node1, node2" in out
        assert wait_gone(pids) == [], f"processes of the run survived {signum}:\n{out}"
        assert wait_gone(clients, 1) == [], f"clients of train survived {signum}"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
        kill_left(pids)


def wait_for_pids_glob(runs: Path, count: int, timeout: float = 60) -> list[list[int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(runs.glob("*/pids"))
        if found:
            return [wait_for_pids(found[0], count, max(1, deadline - time.monotonic()))]
        time.sleep(0.05)
    raise AssertionError(f"no run under {runs} wrote its PIDs within {timeout} s")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def test_ipv6_rendezvous_endpoint_is_bracketed(tmp_path):
    inv = make_inventory(tmp_path, [("n1", "fd00::11", {}), ("n2", "fd00::12", {})])
    assert launch.rendezvous_endpoint(inv) == "[fd00::11]:29500"


# ---------------------------------------------------------------------- train, locally

FAKE_TRAINER = textwrap.dedent("""\
    #!{python}
    # Stands in for torchrun + trainer.train: writes metrics like rank 0 would.
    import json, math, os, sys
""" + TO_REAL_PYTHON + """\
    if sys.argv[1:2] == ["-"]:  # the checks before the launch: the real Python answers
        os.execv(sys.executable, [sys.executable] + sys.argv[1:])
    os.makedirs("out", exist_ok=True)
    losses = {losses!r}
    with open("out/metrics.jsonl", "w") as fh:
        for step, loss in enumerate(losses, 1):
            fh.write(json.dumps({{"step": step, "loss": float(loss)}}) + "\\n")
    with open("out/summary.json", "w") as fh:
        json.dump({{"steps": len(losses)}}, fh)
""")


def fake_train_inventory(tmp_path: Path, losses: list) -> Inventory:
    root = tmp_path / "node1"
    root.mkdir()
    fake = root / "python"
    fake.write_text(FAKE_TRAINER.format(python=sys.executable, losses=[str(x) for x in losses]))
    fake.chmod(0o755)
    port = free_port()  # the rendezvous check listens there
    return make_inventory(tmp_path, [("node1", "127.0.0.1", {
        "dsk_root": str(root), "dsk_python": str(fake), "ansible_connection": "local",
        "dsk_rdzv_port": port})])


TINY = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny.toml"


def test_train_fetches_metrics_and_reports_losses(tmp_path):
    inv = fake_train_inventory(tmp_path, [5.5, 3.0, 1.25])
    result = joblaunch.train(inv, TINY, runs_dir=tmp_path / "runs", timeout_s=60)
    assert (result.first_loss, result.last_loss, result.steps) == (5.5, 1.25, 3)
    assert result.metrics_path == result.run_dir / "metrics.jsonl"
    assert result.summary == {"steps": 3}
    shipped = tmp_path / "node1" / "jobs" / result.name / "config" / "tiny.toml"
    assert shipped.read_text() == TINY.read_text()


def test_train_fails_on_a_non_finite_loss(tmp_path):
    inv = fake_train_inventory(tmp_path, [5.5, float("nan")])
    with pytest.raises(RunFailed, match="not finite from step 2"):
        joblaunch.train(inv, TINY, runs_dir=tmp_path / "runs", timeout_s=60)


def test_train_refuses_a_config_that_does_not_fit_before_any_change(tmp_path):
    config = tmp_path / "two.toml"
    config.write_text(TINY.read_text().replace("dp_shard = -1", "dp_shard = 2"))
    inv = make_inventory(tmp_path, [(f"node{i}", f"10.0.0.{i}", {}) for i in (1, 2, 3)])
    with pytest.raises(InputError) as err:
        joblaunch.train(inv, config, runs_dir=tmp_path / "runs")
    assert "parallel" in str(err.value) and str(config) in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_fetch_that_times_out_names_the_node_and_leaves_no_part_file(tmp_path, monkeypatch):
    import os
    import subprocess

    inv = local_nodes(tmp_path, ["ok"])
    never_written = tmp_path / "node1" / "fifo"
    os.mkfifo(never_written)  # cat blocks on it: a node that stopped answering
    real_run = subprocess.run

    def impatient_run(*args, **kwargs):  # the fetch's own time limit, shortened
        return real_run(*args, **{**kwargs, "timeout": 0.5})

    monkeypatch.setattr(subprocess, "run", impatient_run)
    local = tmp_path / "back" / "result.json"
    started = time.monotonic()
    with pytest.raises(RunFailed) as err:
        remote.fetch(inv, "node1", never_written, local)
    assert time.monotonic() - started < 10
    assert err.value.nodes == ["node1"]
    assert f"could not fetch {never_written} from node1: no answer within" in str(err.value)
    assert list(local.parent.iterdir()) == []  # neither the file nor its .part


def test_interrupt_guard_holds_a_signal_until_the_block_ends():
    import os
    import signal

    from dsk_provision.errors import Interrupted
    from dsk_provision.interrupts import InterruptGuard

    before = signal.getsignal(signal.SIGTERM)
    finished = []
    with pytest.raises(Interrupted) as err, InterruptGuard() as guard:
        with guard.held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here and must not raise
            os.kill(os.getpid(), signal.SIGHUP)  # a second signal changes nothing
            time.sleep(0.1)
            finished.append(True)
    assert finished == [True]
    assert err.value.exit_code == 143 and err.value.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # the old handler is back


def test_harmless_library_lines_go_to_the_log_only(tmp_path):
    """The console gets a node's lines less known-harmless library output (c10d's
    reverse-lookup warning); the node's log gets every line."""
    import types

    lines = ["[default0]:node1 cpu:0 CPU (2 threads): matmul 0.02 TFLOP/s\n",
             "[W1204 17:10:06.722483286 socket.cpp:207] [c10d] The hostname of the client "
             "socket cannot be retrieved. err=-3\n",
             "RuntimeError: boom\n"]
    run = launch.NodeRun("node1", types.SimpleNamespace(stdout=iter(lines)),
                         tmp_path / "node1.log")
    shown = []
    printer = types.SimpleNamespace(line=shown.append)
    launch._stream(run, printer)
    assert shown == ["[node1] " + lines[0].rstrip("\n"), "[node1] RuntimeError: boom"]
    assert (tmp_path / "node1.log").read_text() == "".join(lines)


def test_an_agents_shutdown_trace_goes_to_the_log_only(tmp_path):
    """What torchrun's agent on another node prints when the rendezvous store's node
    finished first (fixtures/torchrun_agent_shutdown.txt, from a sandbox run: a c10d
    warning, a C++ exception's 31 frames, the rendezvous warning) reaches the log, not
    the console; a worker's error and a rank's own frames-free lines still show."""
    import types

    trace = (Path(__file__).parent / "fixtures" / "torchrun_agent_shutdown.txt").read_text()
    lines = [line + "\n" for line in trace.splitlines()]
    assert len(lines) == 35 and sum(line.startswith("frame #") for line in lines) == 31
    kept = ["[default0]:RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
            "Connection closed by peer\n",
            "[default0]:step 2/4 | loss 5.0 | tok/s 10 | mfu 0.1% | mem 0.1 GiB\n"]
    run = launch.NodeRun("node2", types.SimpleNamespace(stdout=iter(lines + kept)),
                         tmp_path / "node2.log")
    shown = []
    launch._stream(run, types.SimpleNamespace(line=shown.append))
    assert shown == ["[node2] " + line.rstrip("\n") for line in kept]
    assert (tmp_path / "node2.log").read_text() == "".join(lines + kept)


def test_ship_to_copies_to_every_node_and_names_each_that_failed(tmp_path):
    """The one copy path of runs and jobs: trainer/ and the files land in each node's
    destination; a node whose destination cannot be made is named with its error, the
    others are still copied."""
    inv = make_inventory(tmp_path, [("n1", "10.0.0.1", {}), ("n2", "10.0.0.2", {}),
                                    ("n3", "10.0.0.3", {})])
    blocker = tmp_path / "n2-file"
    blocker.write_text("a file where a directory should be\n")
    dest = {"n1": tmp_path / "n1" / "job", "n2": blocker / "job", "n3": tmp_path / "n3" / "job"}
    extra = tmp_path / "job.json"
    extra.write_text("{}\n")
    before = set(Path(tempfile.gettempdir()).glob("dsk-ship-*.tar"))
    with pytest.raises(RunFailed) as failed:
        launch.ship_to(inv, lambda node: dest[node.name], {"job.json": extra},
                       transport=remote.LocalTransport())
    assert failed.value.nodes == ["n2"]
    assert "could not copy the trainer to n2 (n2: " in failed.value.message
    assert "Not a directory" in failed.value.message
    for name in ("n1", "n3"):
        assert (dest[name] / "job.json").read_text() == "{}\n"
        assert (dest[name] / "trainer" / "train.py").is_file()
        assert not list(dest[name].rglob("__pycache__"))
    assert set(Path(tempfile.gettempdir()).glob("dsk-ship-*.tar")) <= before


def test_results_come_from_the_first_node_that_has_them(tmp_path, monkeypatch):
    """fetch_first (a run's file) and a job's files share fetch_from_first: the
    nodes in inventory order, the first that has the file, else one error naming it."""
    inv = make_inventory(tmp_path, [("node1", "10.213.7.11", {}), ("node2", "10.213.7.12", {})])
    asked = []

    def fake_fetch(inventory, node, remote_path, local_path, transport=None):
        asked.append((node.name, str(remote_path)))
        if node.name == "node1":
            raise RunFailed(f"{node.name}: no such file")
        return Path(local_path)

    monkeypatch.setattr(launch, "fetch", fake_fetch)
    node, path = launch.fetch_first(inv, "out/metrics.jsonl", "r1", tmp_path / "m.jsonl")
    assert (node, path) == ("node2", tmp_path / "m.jsonl")
    assert asked == [("node1", "/opt/dsk/runs/r1/out/metrics.jsonl"),
                     ("node2", "/opt/dsk/runs/r1/out/metrics.jsonl")]
    asked.clear()
    node, _ = launch.fetch_from_first(inv, lambda n: n.settings.job_dir("j") / "out/summary.json",
                                      tmp_path / "s.json", what="out/summary.json of job j")
    assert node == "node2" and asked[0] == ("node1", "/opt/dsk/jobs/j/out/summary.json")
    monkeypatch.setattr(launch, "fetch", lambda *a, **k: (_ for _ in ()).throw(
        RunFailed("gone")))
    with pytest.raises(RunFailed, match="no node has out/metrics.jsonl of run r1: gone; gone"):
        launch.fetch_first(inv, "out/metrics.jsonl", "r1", tmp_path / "m.jsonl")
