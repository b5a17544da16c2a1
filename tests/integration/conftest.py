"""Integration fixtures: a real 3-node sandbox cluster (root, systemd-nspawn, mmdebstrap).

Fixtures for every integration test:
  sandbox_cluster       SandboxInfo of a 3-node sandbox named "itest" (session-scoped)
  sandbox_name          that sandbox's name; a test that needs a sandbox of its own
                        derives its name from it
  bootstrapped_cluster  BootstrapResult: that sandbox after one `dsk-provision bootstrap`
  node_ssh              node_ssh(ip, command, check=True) -> CompletedProcess, over SSH
                        with the sandbox's key and pinned host keys
  ssh_argv              ssh_argv(info, ip, command, known_hosts=None) -> ssh command line
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# DSK_ITEST_SANDBOX lets two checkouts run the integration suite side by side.
SANDBOX_NAME = os.environ.get("DSK_ITEST_SANDBOX", "itest")
SANDBOX_NODES = 3


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, mounts, systemd-nspawn)"
    for tool, pkg in (("systemd-nspawn", "systemd-container"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} is missing (apt-get install {pkg})"
    return None


SKIP_REASON = _skip_reason()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.sandbox)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def ssh_command(info, ip: str, command: str, *, known_hosts: Path | None = None) -> list[str]:
    """An ssh command line to a sandbox node with its pinned host keys; no master socket."""
    kh = known_hosts or info.state_dir / "ssh/known_hosts"
    return ["ssh", "-i", str(info.state_dir / "ssh/id_ed25519"),
            "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "ControlPath=none", "-o", "ConnectTimeout=10",
            f"root@{ip}", command]


@pytest.fixture(scope="session")
def sandbox_cluster(request):
    from dsk_provision import sandbox

    # Registered before `up` so that a failure half-way still leaves nothing behind.
    request.addfinalizer(lambda: sandbox.down(SANDBOX_NAME))
    sandbox.down(SANDBOX_NAME)  # leftovers of an earlier, interrupted run
    return sandbox.up(SANDBOX_NAME, SANDBOX_NODES, progress=lambda m: print(f"sandbox: {m}"))


@pytest.fixture(scope="session")
def sandbox_name() -> str:
    return SANDBOX_NAME


@pytest.fixture(scope="session")
def node_ssh(sandbox_cluster) -> Callable[..., subprocess.CompletedProcess]:
    def run(ip: str, command: str, *, check: bool = True, timeout: float = 300):
        proc = subprocess.run(ssh_command(sandbox_cluster, ip, command), capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"ssh {ip} {command!r} exited {proc.returncode}:\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc
    return run


@pytest.fixture(scope="session")
def ssh_argv() -> Callable[..., list[str]]:
    """ssh_argv(info, ip, command, known_hosts=None) -> an ssh command line (see ssh_command)."""
    return ssh_command


@dataclass
class BootstrapResult:
    info: object          # SandboxInfo
    returncode: int
    output: str           # stdout + stderr of the first bootstrap
    runs_dir: Path

    def require_success(self) -> None:
        if self.returncode != 0:
            pytest.fail(f"dsk-provision bootstrap exited {self.returncode}:\n"
                        f"{self.output[-6000:]}")


@pytest.fixture(scope="session")
def bootstrapped_cluster(sandbox_cluster, tmp_path_factory) -> BootstrapResult:
    runs = tmp_path_factory.mktemp("runs")
    exe = Path(sys.prefix) / "bin" / "dsk-provision"
    env = dict(os.environ, DSK_RUNS_DIR=str(runs))
    proc = subprocess.run([str(exe), "bootstrap", "-i", str(sandbox_cluster.inventory_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    return BootstrapResult(info=sandbox_cluster, returncode=proc.returncode,
                           output=proc.stdout + proc.stderr, runs_dir=runs)
