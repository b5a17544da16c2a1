"""train --container: the runtime's command line per node (docker and podman, GPU and CPU
nodes), the job's start line, the image check before the launch, and what is refused."""

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
        argv = _supervised(line)
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
        else:
            assert "--device" not in argv
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
    argv = shlex.split(run)
    assert argv[:3] == ["podman", "run", "-i"]
    assert ("--device", "nvidia.com/gpu=all") in pairs(argv)
    assert argv[argv.index("reg.example/trainer:1") + 1:][:2] == [
        inv.nodes[0].settings.python, "-"]
    assert "--serve" in argv


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
