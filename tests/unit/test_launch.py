"""launch.py: SSH command lines, torchrun lines, environment, and fail fast without a sandbox."""

from __future__ import annotations

import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsk_provision import launch, remote
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
    assert "echo $$ > /opt/dsk/runs/r1/torchrun-node2.pid" in line
    assert "exec env" in line
    tokens = shlex.split(line.split("exec env ", 1)[1])
    assert "X=1 2" in tokens
    assert "PYTHONPATH=/opt/dsk/runs/r1" in tokens
    assert tokens[-1] == "a b; rm -rf /"  # one argument, not shell code


def test_stop_command_only_signals_this_runs_pid():
    node = Node("node2", "10.0.0.2", 22, "root", 0, {"dsk_root": "/opt/dsk"})
    line = launch.stop_command(node, "r1")
    assert "/opt/dsk/runs/r1/torchrun-node2.pid" in line
    assert "kill -TERM $p" in line
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


def test_ipv6_rendezvous_endpoint_is_bracketed(tmp_path):
    inv = make_inventory(tmp_path, [("n1", "fd00::11", {}), ("n2", "fd00::12", {})])
    assert launch.rendezvous_endpoint(inv) == "[fd00::11]:29500"


# ---------------------------------------------------------------------- train, locally

FAKE_TRAINER = textwrap.dedent("""\
    #!{python}
    # Stands in for torchrun + trainer.train: writes metrics like rank 0 would.
    import json, math, os
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
    return make_inventory(tmp_path, [("node1", "127.0.0.1", {
        "dsk_root": str(root), "dsk_python": str(fake), "ansible_connection": "local"})])


TINY = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny.toml"


def test_train_fetches_metrics_and_reports_losses(tmp_path):
    inv = fake_train_inventory(tmp_path, [5.5, 3.0, 1.25])
    result = launch.train(inv, TINY, runs_dir=tmp_path / "runs", timeout_s=60)
    assert (result.first_loss, result.last_loss, result.steps) == (5.5, 1.25, 3)
    assert result.metrics_path == result.run_dir / "metrics.jsonl"
    assert result.summary == {"steps": 3}
    shipped = tmp_path / "node1" / "runs" / result.run_dir.name / "config" / "tiny.toml"
    assert shipped.read_text() == TINY.read_text()


def test_train_fails_on_a_non_finite_loss(tmp_path):
    inv = fake_train_inventory(tmp_path, [5.5, float("nan")])
    with pytest.raises(RunFailed, match="not finite from step 2"):
        launch.train(inv, TINY, runs_dir=tmp_path / "runs", timeout_s=60)


def test_train_refuses_a_config_that_does_not_fit_before_any_change(tmp_path):
    config = tmp_path / "two.toml"
    config.write_text(TINY.read_text().replace("dp_shard = -1", "dp_shard = 2"))
    inv = make_inventory(tmp_path, [(f"node{i}", f"10.0.0.{i}", {}) for i in (1, 2, 3)])
    with pytest.raises(InputError) as err:
        launch.train(inv, config, runs_dir=tmp_path / "runs")
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
