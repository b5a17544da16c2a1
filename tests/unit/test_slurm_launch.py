"""The slurm launcher's sbatch script, parsed and run with stand-ins for Slurm's commands:
its #SBATCH options, one torchrun per node with the SSH launcher's environment, the
rendezvous on the job's first node; the choice of launcher; scontrol's job records."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_launch import make_inventory

from dsk_provision import launch, slurm, slurmctl
from dsk_provision.errors import InputError

RUN = "20260101-000000-train"


def inventory(tmp_path, **extra):
    settings = {"dsk_socket_ifname": "eth0", "dsk_gpus_per_node": 8,
                "dsk_slurm_enabled": True, "dsk_nccl_env": {"NCCL_IB_HCA": "mlx5"}, **extra}
    return make_inventory(tmp_path, [("node1", "10.0.0.11", {}),
                                     ("node2", "10.0.0.12", {"dsk_socket_ifname": "ib0"}),
                                     ("node3", "10.0.0.13", {})], **settings)


def script_for(inv, **options) -> str:
    return slurm.sbatch_script(inv, "trainer.train", ["--config", "config/my run.toml"],
                               run_id=RUN, options=slurm.SlurmOptions(**options))


def sbatch_options(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            out[key] = value
    return out


def test_sbatch_options_follow_the_job_options(tmp_path):
    script = script_for(inventory(tmp_path), nodes=2, time_limit="1-02:00:00",
                        partition="h100")
    assert script.startswith("#!/bin/bash\n")
    opts = sbatch_options(script)
    assert opts["--nodes"] == "2" and opts["--ntasks-per-node"] == "1"
    assert opts["--gpus-per-node"] == "8"
    assert opts["--time"] == "1-02:00:00" and opts["--partition"] == "h100"
    assert opts["--chdir"] == f"/opt/dsk/runs/{RUN}"
    assert opts["--output"] == f"/opt/dsk/runs/{RUN}/slurm-%j.out"
    assert "--no-requeue" in opts
    # Without options: every node, the inventory's GPUs, Slurm's partition and time limit.
    opts = sbatch_options(script_for(inventory(tmp_path), gpus_per_node=0))
    assert opts["--nodes"] == "3" and "--gpus-per-node" not in opts
    assert "--time" not in opts and "--partition" not in opts
    # The #SBATCH lines come before the first command, or sbatch ignores them.
    lines = [ln for ln in script.splitlines()[1:] if not ln.startswith("#")]
    first_command = script.splitlines().index(lines[0])
    assert all(not ln.startswith("#SBATCH") for ln in script.splitlines()[first_command:])


def _run(tmp_path: Path, script: str, nodelist: str) -> dict[str, dict]:
    """Run the script with stand-ins: scontrol expands the node list, srun runs its step
    once per node (SLURMD_NODENAME set), python prints its argv and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "steps"
    out.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'while [ "${1#-}" != "$1" ]; do shift; done\n'
        'for n in $(echo "$SLURM_JOB_NODELIST" | tr , " "); do\n'
        '  SLURMD_NODENAME=$n "$@" > ' + str(out) + '/$n || exit $?\n'
        "done\n")
    fake_python = bin_dir / "python"
    fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"; echo ---; env\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = script.replace("/opt/dsk/venv/bin/python", str(fake_python))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": nodelist,
           "SLURM_JOB_NUM_NODES": str(len(nodelist.split(",")))}
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    steps = {}
    for f in out.iterdir():
        argv, _, environ = f.read_text().partition("---\n")
        steps[f.name] = {"argv": argv.splitlines(),
                         "env": dict(line.split("=", 1) for line in environ.splitlines()
                                     if "=" in line)}
    return steps


def test_one_torchrun_per_node_rendezvous_on_the_first_node_of_the_job(tmp_path):
    inv = inventory(tmp_path)
    steps = _run(tmp_path, script_for(inv, nodes=2), "node2,node3")
    assert sorted(steps) == ["node2", "node3"]
    for name, step in steps.items():
        argv = step["argv"]
        assert argv[:2] == ["-m", "torch.distributed.run"]
        value = {argv[i]: argv[i + 1] for i in range(2, argv.index("-m", 2), 1)
                 if argv[i].startswith("--") and i + 1 < len(argv)}
        assert value["--nnodes"] == "2" and value["--nproc_per_node"] == "8"
        assert value["--rdzv_backend"] == "c10d"
        assert value["--rdzv_endpoint"] == "10.0.0.12:29500"   # node2: the job's first
        assert value["--rdzv_id"] == RUN
        assert value["--log-dir"] == f"/opt/dsk/runs/{RUN}/torchrun-logs/{name}"
        assert argv[argv.index("-m", 2):] == ["-m", "trainer.train", "--config",
                                               "config/my run.toml"]
        # The SSH launcher's environment for this node, exactly.
        node = next(n for n in inv.nodes if n.name == name)
        want = launch.node_env(node, remote_dir=f"/opt/dsk/runs/{RUN}", run_id=RUN)
        assert {k: step["env"].get(k) for k in want} == want
    assert steps["node2"]["env"]["NCCL_SOCKET_IFNAME"] == "ib0"
    assert steps["node3"]["env"]["NCCL_SOCKET_IFNAME"] == "eth0"
    assert steps["node3"]["env"]["NCCL_IB_HCA"] == "mlx5"


def test_a_node_outside_the_inventory_stops_the_job(tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(script_for(inventory(tmp_path)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$3"\n')
    (bin_dir / "scontrol").chmod(0o755)
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin",
                               "SLURM_JOB_NODELIST": "stranger"})
    assert proc.returncode == 2 and "stranger is not a node of the inventory" in proc.stderr


@pytest.mark.parametrize(("options", "field"), [
    ({"nodes": 4}, "nodes"), ({"time_limit": "soon"}, "time_limit"),
    ({"partition": "a b"}, "partition"), ({"gpus_per_node": -1}, "gpus_per_node")])
def test_bad_job_options_are_refused(tmp_path, options, field):
    with pytest.raises(InputError) as err:
        script_for(inventory(tmp_path), **options)
    assert err.value.field == field


def test_the_launcher_needs_slurm_and_a_controller_in_service(tmp_path):
    assert slurm.launcher(inventory(tmp_path)) == "ssh"
    assert slurm.launcher(inventory(tmp_path, dsk_launcher="slurm")) == "slurm"
    assert slurm.launcher(inventory(tmp_path, dsk_launcher="slurm"), "ssh") == "ssh"
    assert slurmctl.controller(inventory(tmp_path)).name == "node1"
    assert slurmctl.controller(inventory(tmp_path, dsk_slurm_controller="node3")).name == "node3"
    with pytest.raises(InputError) as err:
        slurmctl.controller(inventory(tmp_path, dsk_slurm_enabled=False))
    assert err.value.field == "dsk_slurm_enabled"
    with pytest.raises(InputError):
        slurmctl.controller(inventory(tmp_path, dsk_slurm_controller="node9"))


def test_scontrol_job_records_are_read():
    line = ("JobId=42 JobName=dsk-x UserId=root(0) JobState=FAILED Reason=NonZeroExitCode "
            "Dependency=(null) ExitCode=1:0 NodeList=node[1-3] BatchHost=node1\n")
    job = slurmctl.parse_job(line)
    assert (job.job_id, job.state, job.exit_code, job.reason, job.batch_host) == (
        "42", "FAILED", "1:0", "NonZeroExitCode", "node1")
    assert not job.active
    assert slurmctl.parse_job(line.replace("FAILED", "RUNNING")).active
    assert slurmctl.parse_job("") is None


def test_the_script_is_valid_bash(tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(script_for(inventory(tmp_path)))
    subprocess.run(["bash", "-n", str(path)], check=True)


def _inventory_file(tmp_path: Path, **extra) -> Path:
    import yaml

    hosts = tmp_path / "inv" / "hosts.yml"
    hosts.parent.mkdir()
    hosts.write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_cluster_name": "slurmcli", "dsk_gpus_per_node": 0,
                 "dsk_slurm_enabled": True, "ansible_user": "root", **extra},
        "children": {"nodes": {"hosts": {f"node{i}": {"ansible_host": f"10.0.0.{10 + i}"}
                                         for i in (1, 2, 3)}}}}}))
    return hosts


def test_dry_run_prints_the_script_and_starts_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dsk_provision.cli import app

    monkeypatch.setenv("DSK_STATE_DIR", str(tmp_path / "state"))
    tiny = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny.toml"
    hosts = _inventory_file(tmp_path, dsk_launcher="slurm")
    result = CliRunner().invoke(app, ["--runs-dir", str(tmp_path / "runs"), "train", "-i",
                                      str(hosts), "--config", str(tiny), "--dry-run",
                                      "--nodes", "3", "--partition", "main"])
    assert result.exit_code == 0, result.output
    opts = sbatch_options(result.output)
    assert opts["--nodes"] == "3" and opts["--partition"] == "main"
    assert "srun --kill-on-bad-exit=1" in result.output
    assert not (tmp_path / "runs").exists()   # no run directory: nothing was started
    # The SSH launcher has no script to print.
    result = CliRunner().invoke(app, ["train", "-i", str(hosts), "--config", str(tiny),
                                      "--dry-run", "--launcher", "ssh"])
    assert result.exit_code == 2 and "options of the slurm launcher" in result.output
