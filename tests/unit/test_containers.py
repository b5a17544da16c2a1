"""train --container: the runtime's command line per node (docker and podman, GPU and CPU
nodes, RDMA's memlock limit and InfiniBand devices), the job's start line, the image check
before the launch, and what is refused."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from dsk_provision import containers, defaults, preflight
from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory
from dsk_provision.joblaunch import start_command

REPO = Path(__file__).resolve().parents[2]


def inventory(tmp_path: Path, *, runtime: str | None = None, gpus: int = 0,
              extra: dict | None = None):
    """Two nodes: node1 with ``gpus`` GPUs, node2 a CPU node."""
    values: dict = {"dsk_gpus_per_node": 0, "dsk_root": "/opt/dsk", "dsk_rdzv_port": 29511,
                    "dsk_socket_ifname": "eth0", "dsk_nccl_env": {"NCCL_IB_HCA": "mlx5"}}
    if runtime:
        values["containers_runtime"] = runtime
    values.update(extra or {})
    data = {"all": {"vars": values, "children": {"nodes": {"hosts": {
        "node1": {"ansible_host": "10.0.0.1", "dsk_gpus": gpus},
        "node2": {"ansible_host": "10.0.0.2"}}}}}}
    hosts = tmp_path / "inventory" / "hosts.yml"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(yaml.safe_dump(data))
    return load_inventory(hosts)


def unwrapped(argv: list[str]) -> list[str]:
    """The runtime's argv inside the ``sh -c`` wrapper of a GPU node with RDMA on."""
    if argv[0] != "sh":
        return argv
    assert argv[1] == "-c" and argv[3] == "sh"
    return argv[4:]


def test_the_runtime_is_the_containers_roles_setting(tmp_path):
    inv = inventory(tmp_path)
    default = yaml.safe_load((REPO / "roles/containers/defaults/main.yml").read_text())
    assert containers.runtime(inv.nodes[0]) == default["containers_runtime"]
    assert defaults.resolve("containers_runtime", {}, role="containers") == \
        default["containers_runtime"]
    assert containers.runtime(inventory(tmp_path / "p", runtime="podman").nodes[1]) == "podman"


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_gpu_nodes_get_every_gpu_through_cdi_and_cpu_nodes_none(tmp_path, runtime):
    inv = inventory(tmp_path, runtime=runtime, gpus=8)
    gpu, cpu = inv.nodes
    command = ["/opt/dsk/venv/bin/python", "-m", "torch.distributed.run", "--nnodes", "2"]
    env = {"NCCL_IB_HCA": "mlx5", "DSK_JOB": "j"}
    for node in (gpu, cpu):
        argv = containers.run_argv(node, "reg.example/trainer:1", command, name="dsk-job-j",
                                   workdir="/opt/dsk/jobs/j",
                                   binds=["/opt/dsk/jobs/j", "/shared/ckpt/j", "/opt/dsk/jobs/j"],
                                   env=env)
        assert (argv[0] == "sh") == (node is gpu)
        argv = unwrapped(argv)
        assert argv[:4] == [runtime, "run", "--rm", "--name"]
        assert argv[argv.index("--network") + 1] == "host"
        assert argv[argv.index("--ipc") + 1] == "host"
        devices = [argv[i + 1] for i, a in enumerate(argv) if a == "--device"]
        assert devices == (["nvidia.com/gpu=all"] if node is gpu else [])
        volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
        assert volumes == ["/opt/dsk/jobs/j:/opt/dsk/jobs/j", "/shared/ckpt/j:/shared/ckpt/j"]
        assert argv[argv.index("-w") + 1] == "/opt/dsk/jobs/j"
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "-e"] == [
            "NCCL_IB_HCA=mlx5", "DSK_JOB=j"]
        image_at = argv.index("reg.example/trainer:1")
        assert argv[image_at + 1:] == command


def pairs(argv: list[str]) -> set[tuple[str, str]]:
    return set(zip(argv, argv[1:], strict=False))


def _supervised(line: str) -> list[str]:
    tail = shlex.split(line.split("setsid -f ", 1)[1])
    return tail[tail.index("--") + 1:tail.index(">>")]


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_the_job_runs_torchrun_in_the_image_with_the_hosts_environment(tmp_path, runtime):
    inv = inventory(tmp_path, runtime=runtime, gpus=8,
                    extra={"dsk_checkpoint_dir": "/shared/ckpt"})
    for node in inv.nodes:
        plain = start_command(inv, node, "j1", "config/tiny.toml", "L1", nproc=2,
                              max_restarts=1)
        line = start_command(inv, node, "j1", "config/tiny.toml", "L1", nproc=2,
                             max_restarts=1, container="reg.example/trainer:1")
        torchrun = _supervised(plain)
        argv = unwrapped(_supervised(line))
        assert argv[0] == runtime and argv[1] == "run"
        image_at = argv.index("reg.example/trainer:1")
        assert argv[image_at + 1:] == torchrun  # the same torchrun, the same python path
        passed = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv[:image_at])
                      if a == "-e")
        # Every variable the supervisor gets on the host reaches the ranks in the image.
        host_env = shlex.split(plain.split("setsid -f env ", 1)[1].split(" -m trainer.job")[0])
        host_vars = dict(v.split("=", 1) for v in host_env if "=" in v)
        assert passed == host_vars
        assert passed["NCCL_IB_HCA"] == "mlx5" and passed["NCCL_SOCKET_IFNAME"] == "eth0"
        assert passed["DSK_JOB"] == "j1" and passed["DSK_JOB_DIR"] == "/opt/dsk/jobs/j1"
        assert ("-v", "/shared/ckpt/j1:/shared/ckpt/j1") in pairs(argv)
        if node.name == "node1":
            assert ("--device", "nvidia.com/gpu=all") in pairs(argv)
            assert ("--ulimit", "memlock=-1:-1") in pairs(argv)
        else:
            assert "--device" not in argv and "--ulimit" not in argv
        # A container of the same name left by a killed launch is removed first, and the
        # checkpoint directory exists before the runtime binds it.
        prepare = line.split("setsid -f ", 1)[0]
        assert f"mkdir -p /shared/ckpt/j1 && {{ {runtime} rm -f dsk-job-j1 " in prepare


def test_a_node_without_a_runtime_or_a_bad_image_is_refused(tmp_path):
    inv = inventory(tmp_path, extra={"containers_enabled": False})
    with pytest.raises(InputError, match="node1 has no container runtime"):
        containers.runtime(inv.nodes[0])
    for bad in ("", "a b", "x;rm -rf /", "-v"):
        with pytest.raises(InputError, match="--container"):
            containers.check_image(bad)
    assert containers.check_image(" nvcr.io/nvidia/pytorch:25.01-py3 ") == \
        "nvcr.io/nvidia/pytorch:25.01-py3"


def test_the_probe_runs_in_the_image_after_the_image_check(tmp_path):
    inv = inventory(tmp_path, runtime="podman", gpus=4)
    line = preflight.probe_command(inv.nodes[0], host="10.0.0.1", port=29511, serve=True,
                                   peers=2, modules=["torch"], gpus=4, wait_s=10,
                                   container="reg.example/trainer:1")
    check, remove, run = line.split(" && ", 2)
    assert "podman image inspect reg.example/trainer:1" in check
    assert "podman pull -q reg.example/trainer:1" in check
    argv = unwrapped(shlex.split(run))
    assert argv[:3] == ["podman", "run", "-i"]
    assert ("--device", "nvidia.com/gpu=all") in pairs(argv)
    assert argv[argv.index("reg.example/trainer:1") + 1:][:2] == [
        inv.nodes[0].settings.python, "-"]
    assert "--serve" in argv


RUN = dict(name="dsk-job-j", workdir="/opt/dsk/jobs/j", binds=["/opt/dsk/jobs/j"],
           env={"DSK_JOB": "j"})


@pytest.mark.parametrize("extra", [{}, {"rdma_enabled": False}])
def test_cpu_nodes_and_nodes_without_rdma_run_the_runtime_directly(tmp_path, extra):
    inv = inventory(tmp_path, runtime="podman", gpus=8, extra=extra)
    gpu, cpu = inv.nodes
    plain = ["podman", "run", "--rm", "--name", "dsk-job-j", "--network", "host",
             "--ipc", "host", "-v", "/opt/dsk/jobs/j:/opt/dsk/jobs/j", "-w", "/opt/dsk/jobs/j",
             "-e", "DSK_JOB=j", "x/y:1", "python", "-c", "pass"]
    assert containers.run_argv(cpu, "x/y:1", ["python", "-c", "pass"], **RUN) == plain
    gpu_argv = containers.run_argv(gpu, "x/y:1", ["python", "-c", "pass"], **RUN)
    if extra:  # rdma_enabled: false: the GPUs, no memlock limit, no InfiniBand devices
        assert gpu_argv == [*plain[:9], "--device", "nvidia.com/gpu=all", *plain[9:]]
    else:
        assert gpu_argv[0] == "sh"
        assert unwrapped(gpu_argv) == [*plain[:9], "--ulimit", "memlock=-1:-1", "--device",
                                       "nvidia.com/gpu=all", *plain[9:]]


def test_gpu_nodes_get_the_rdma_roles_memlock_limit(tmp_path):
    default = yaml.safe_load((REPO / "roles/rdma/defaults/main.yml").read_text())
    assert default["rdma_enabled"] is True and default["rdma_memlock"] == "unlimited"
    for memlock, limit in (("unlimited", -1), (8388608, 8 << 30), ("1024", 1 << 20),
                           ("infinity", -1)):
        inv = inventory(tmp_path / str(memlock), gpus=1, extra={"rdma_memlock": memlock})
        assert containers.memlock_limit(inv.nodes[0]) == limit
        argv = unwrapped(containers.run_argv(inv.nodes[0], "x/y:1", ["true"], **RUN))
        assert ("--ulimit", f"memlock={limit}:{limit}") in pairs(argv)


@pytest.mark.parametrize("memlock", ["lots", "-5", "1.5", "", True, 2.5, [1]])
def test_a_bad_memlock_limit_is_refused_naming_the_setting_and_node(tmp_path, memlock):
    inv = inventory(tmp_path, gpus=1, extra={"rdma_memlock": memlock})
    with pytest.raises(InputError, match=r"^rdma_memlock: node1: .* is not a memlock limit"):
        containers.run_argv(inv.nodes[0], "x/y:1", ["true"], **RUN)
    # A CPU node does not use it.
    assert containers.run_argv(inv.nodes[1], "x/y:1", ["true"], **RUN)[0] == "docker"


def test_a_bad_rdma_setting_is_refused_before_any_connection(tmp_path, monkeypatch):
    from dsk_provision import joblaunch

    def connect(*_args, **_kwargs):
        raise AssertionError("a node was contacted")

    monkeypatch.setattr(joblaunch, "_check_free", connect)
    monkeypatch.setattr(joblaunch, "on_nodes", connect)
    config = REPO / "trainer/configs/tiny.toml"
    for extra, field in (({"rdma_memlock": "lots"}, "rdma_memlock"),
                         ({"rdma_enabled": "maybe"}, "rdma_enabled")):
        inv = inventory(tmp_path / field, gpus=1, extra=extra)
        with pytest.raises(InputError, match=rf"^{inv.path}: {field}: node1: ") as err:
            joblaunch.start_job(inv, config, "j", container="x/y:1")
        assert err.value.field == field
        # Without --container the setting is the rdma role's business only.
        with pytest.raises(AssertionError, match="contacted"):
            joblaunch.start_job(inv, config, "j")


def _echo_runtime(tmp_path: Path) -> Path:
    """A runtime on PATH that writes its argv, one NUL-ended argument each, and its stdin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "podman"
    fake.write_text("#!/bin/sh\nprintf '%s\\0' \"$0\" \"$@\"\ncat\n")
    fake.chmod(0o755)
    return bin_dir


def _received(stdout: str) -> tuple[list[str], str]:
    *args, rest = stdout.split("\0")
    return [Path(args[0]).name, *args[1:]], rest


@pytest.mark.parametrize("has_hca", [True, False])
def test_the_infiniband_devices_go_in_where_the_node_has_them(tmp_path, monkeypatch, has_hca):
    devices = tmp_path / "dev ices" / "infiniband"  # a space, to be quoted in the script
    if has_hca:
        devices.mkdir(parents=True)
    monkeypatch.setattr(containers, "IB_DEVICES", str(devices))
    bin_dir = _echo_runtime(tmp_path)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    inv = inventory(tmp_path, runtime="podman", gpus=2)
    command = ["python", "-c", "print('a  b')", "$HOME", '"q"', "", "*"]
    run = dict(RUN, env={"DSK_JOB": "j", "X": "two  words; $PATH"})
    argv = containers.run_argv(inv.nodes[0], "x/y:1", command, **run)
    expected = unwrapped(argv)
    with_devices = [*expected[:2], "--device", str(devices), *expected[2:]]
    # Exec'd as the supervisor does, without a shell of the caller's.
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, input="",
                          check=True)
    assert _received(proc.stdout)[0] == (with_devices if has_hca else expected)
    assert ("-e", "X=two  words; $PATH") in pairs(expected)
    assert expected[-len(command):] == command

    # The job's supervisor gets the same: its argv after "--", exec'd as is.
    line = start_command(inv, inv.nodes[0], "j1", "config/tiny.toml", "L1", nproc=2,
                         max_restarts=1, container="x/y:1")
    argv = _supervised(line)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, input="",
                          check=True)
    inner = unwrapped(argv)
    assert _received(proc.stdout)[0] == (
        [*inner[:2], "--device", str(devices), *inner[2:]] if has_hca else inner)

    # The probe comes on stdin, through the shell, to the runtime run with -i.
    probe = preflight.probe_command(inv.nodes[0], host="10.0.0.1", port=29511, serve=False,
                                    peers=1, modules=["torch"], gpus=2, wait_s=10,
                                    container="x/y:1")
    run_line = probe.split(" && ", 2)[2]
    proc = subprocess.run(["/bin/sh", "-c", run_line], capture_output=True, text=True,
                          env=env, input="print('probe')\n", check=True)
    args, stdin = _received(proc.stdout)
    assert args[:2] == ["podman", "run"] and stdin == "print('probe')\n"
    assert args[2:5] == (["--device", str(devices), "-i"] if has_hca else ["-i", "--rm",
                                                                           "--name"])


def _fake_runtime(tmp_path: Path, *, has_image: bool, pull_error: str = "") -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "podman"
    fake.write_text("#!/bin/sh\n"
                    f'case "$1 $2" in "image inspect") exit {0 if has_image else 1};;\n'
                    f'"pull -q") echo "{pull_error}" >&2; exit 125;; esac\nexit 0\n')
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("has_image", [True, False])
def test_the_image_check_says_why_an_image_is_missing(tmp_path, has_image):
    inv = inventory(tmp_path, runtime="podman")
    bin_dir = _fake_runtime(tmp_path, has_image=has_image,
                            pull_error="Error: initializing source: connection refused")
    proc = subprocess.run(["/bin/sh", "-c", containers.image_command(inv.nodes[0], "x/y:1")],
                          capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    if has_image:
        assert proc.returncode == 0 and proc.stdout == ""
        return
    assert proc.returncode == 4
    check = preflight.judge(inv.nodes[0], proc.returncode, proc.stdout, host="10.0.0.1",
                            port=29511, first="node1", serve=False, ranks=1, gpus=0,
                            ssh=True, timeout_s=60, container="x/y:1")
    assert check.problems == ["image x/y:1: not on this node and cannot be pulled: "
                              "Error: initializing source: connection refused"]


def test_no_runtime_on_the_node_is_said(tmp_path):
    inv = inventory(tmp_path, runtime="docker")
    proc = subprocess.run(["/bin/sh", "-c", containers.image_command(inv.nodes[0], "x/y:1")],
                          capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert proc.returncode == 3 and "no docker on this node" in proc.stdout


def test_slurm_refuses_container(tmp_path):
    from typer.testing import CliRunner

    from dsk_provision.cli import app

    inv = inventory(tmp_path)
    result = CliRunner().invoke(app, ["train", "-i", str(inv.hosts_file), "--config",
                                      str(REPO / "trainer/configs/tiny.toml"),
                                      "--launcher", "slurm", "--container", "x/y:1"])
    assert result.exit_code == 2
    assert "slurm launcher does not run jobs in a container image" in result.output
