"""The GPU roles end to end on a 1-node sandbox ("gpus") against a FIXTURE copy of
NVIDIA's CUDA repository (tests/fixtures/nvidia_repo), served on the sandbox bridge.

The nodes have no GPU, so the roles run with their *_force switches: what is proven is
the repository set-up (keyring package, signed source list), pinning, holds, a pin
change, idempotence, honest check mode, and a bad pin failing with the versions the
repository offers. The rdma role runs for real from the sandbox's apt mirror.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsk_provision.errors import RunFailed

REPO = Path(__file__).resolve().parents[2]
SANDBOX_NAME = "gpus"
REPO_PORT = 8093  # the sandbox mirror uses 8080
V1 = {"driver": "580.95.05", "nccl": "2.28.3-1+cuda13.0"}
V2 = {"driver": "580.159.04", "nccl": "2.28.9-1+cuda13.0"}
NCCL_ENV = {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_NET_GDR_LEVEL": "PHB"}
# The fixture repository's own pins (its keyring package's sha256, its key's fingerprint),
# in place of NVIDIA's: set by the nvidia_repo_url fixture.
REPO_TRUST: dict = {}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpus_sandbox(request):
    from dsk_provision import sandbox

    request.addfinalizer(lambda: sandbox.down(SANDBOX_NAME))
    sandbox.down(SANDBOX_NAME)
    # One node: the roles' work is per node (a failure naming every node is the bootstrap
    # tests' business), and a second node doubled the cost of each of the five runs.
    return sandbox.up(SANDBOX_NAME, 1, progress=lambda m: print(f"sandbox: {m}"))


@pytest.fixture(scope="module")
def nvidia_repo_url(gpus_sandbox, tmp_path_factory) -> str:
    sys.path.insert(0, str(REPO / "tests/fixtures"))
    import nvidia_repo

    repo = nvidia_repo.build_repo(tmp_path_factory.mktemp("nvrepo") / "repos")
    keyring_deb = repo.root / repo.path / f"cuda-keyring_{nvidia_repo.KEYRING_VERSION}_all.deb"
    REPO_TRUST.update(
        cuda_repo_keyring_sha256={repo.path.rstrip("/"): hashlib.sha256(
            keyring_deb.read_bytes()).hexdigest()},
        cuda_repo_key_fingerprints=[repo.fingerprint])
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", gpus_sandbox.bridge_ip, str(REPO_PORT),
         "--directory", str(repo.root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((gpus_sandbox.bridge_ip, REPO_PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield repo.url(f"http://{gpus_sandbox.bridge_ip}:{REPO_PORT}/")
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def inventory(gpus_sandbox):
    from dsk_provision.inventory import load_inventory
    from dsk_provision.runner import run_playbook

    inv = load_inventory(gpus_sandbox.inventory_path)
    # The apt mirror (rdma packages) is the common role's business; bootstrap runs it first.
    run_playbook("site.yml", inv, command="gpu-stack-common", tags=["common"])
    return inv


def _run(inventory, repo_url, tmp_path, pins, *, check=False, **extra):
    from dsk_provision.runner import run_playbook

    extra_vars = {
        "nvidia_driver_force": True, "nvidia_driver_kernel_headers": False,
        "nvidia_driver_version": pins["driver"], "fabric_manager_force": True,
        "cuda_force": True, "cuda_repo_url": repo_url, "nccl_force": True,
        "nccl_version": pins["nccl"], "containers_enabled": False, "dsk_nccl_env": NCCL_ENV,
        # Valid IPoIB input; the nodes have neither ib0 nor ifupdown, so nothing is written.
        "rdma_ipoib_enabled": True,
        "rdma_ipoib_interfaces": [{"device": "ib0", "address": "10.10.0.11/16"}],
        **REPO_TRUST,
        **extra,
    }
    return run_playbook("site.yml", inventory, command="gpu-stack", tags=["gpu_stack"],
                        runs_dir=tmp_path, extra_vars=extra_vars, check=check)


def _on(info, node_ip: str, command: str) -> str:
    argv = ["ssh", "-i", str(info.state_dir / "ssh/id_ed25519"),
            "-o", f"UserKnownHostsFile={info.state_dir / 'ssh/known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ControlPath=none",
            f"root@{node_ip}", command]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def _versions(info, ip: str) -> dict[str, str]:
    out = _on(info, ip, "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' "
                        "nvidia-open-580 nvidia-fabricmanager-580 cuda-toolkit-13-0 libnccl2 "
                        "libnccl-dev cuda-keyring rdma-core perftest 2>/dev/null || true")
    return {f[0]: f[1] for f in (line.split() for line in out.splitlines())
            if len(f) == 3 and f[2][1] == "i"}


def test_pin_hold_change_idempotence_and_bad_pin(gpus_sandbox, inventory, nvidia_repo_url,
                                                  tmp_path):
    info = gpus_sandbox
    ips = [ip for _, ip in info.nodes]

    # Check mode on fresh nodes: reports what it would do, installs nothing.
    _run(inventory, nvidia_repo_url, tmp_path, V1, check=True)
    assert "libnccl2" not in _versions(info, ips[0])

    first = _run(inventory, nvidia_repo_url, tmp_path, V1)
    assert all(first.recap[h]["changed"] > 0 for h in first.recap)
    for ip in ips:
        v = _versions(info, ip)
        assert v["nvidia-open-580"] == "580.95.05-1"
        assert v["nvidia-fabricmanager-580"] == "580.95.05-1"
        assert v["libnccl2"] == v["libnccl-dev"] == V1["nccl"]
        assert v["cuda-toolkit-13-0"] == "13.0.2-1"  # no toolkit pin: the newest
        assert v["cuda-keyring"] == "1.1-1" and "rdma-core" in v and "perftest" in v
        held = _on(info, ip, "dpkg --get-selections | awk '$2==\"hold\"{print $1}'").split()
        assert {"nvidia-open-580", "nvidia-fabricmanager-580", "cuda-toolkit-13-0",
                "libnccl2", "libnccl-dev"} <= set(held)
        assert "rdma-core" not in held  # unpinned distribution packages are not held
        src = _on(info, ip, "cat /etc/apt/sources.list.d/cuda-debian12-x86_64.list")
        assert f"signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {nvidia_repo_url} /" in src
        assert _on(info, ip, "readlink /usr/local/cuda").strip() == "/usr/local/cuda-13.0"
        conf = _on(info, ip, "cat /etc/nccl.conf")
        assert "NCCL_IB_HCA=mlx5_0,mlx5_1" in conf and "NCCL_SOCKET_IFNAME=eth0" in conf
        limits = _on(info, ip, "cat /etc/security/limits.d/90-dsk-rdma-memlock.conf")
        assert "memlock    unlimited" in limits
        assert "ib_uverbs" in _on(info, ip, "cat /etc/modules-load.d/dsk-rdma.conf")
        # The fixture driver package ships an inert nvidia-persistenced unit: enabled under systemd.
        assert "nvidia-persistenced" in _on(info, ip, "systemctl is-enabled nvidia-persistenced "
                                                      "&& echo nvidia-persistenced")

    second = _run(inventory, nvidia_repo_url, tmp_path, V2)
    assert all(second.recap[h]["changed"] > 0 for h in second.recap)
    for ip in ips:
        v = _versions(info, ip)
        assert v["nvidia-open-580"] == "580.159.04-1"
        assert v["nvidia-fabricmanager-580"] == "580.159.04-1"
        assert v["libnccl2"] == v["libnccl-dev"] == V2["nccl"]
        held = _on(info, ip, "dpkg --get-selections | awk '$2==\"hold\"{print $1}'").split()
        assert {"nvidia-open-580", "libnccl2", "libnccl-dev"} <= set(held)

    # Idempotence: the same pins again change nothing.
    again = _run(inventory, nvidia_repo_url, tmp_path, V2)
    assert {h: r["changed"] for h, r in again.recap.items()} == {h: 0 for h in again.recap}

    with pytest.raises(RunFailed) as failed:
        _run(inventory, nvidia_repo_url, tmp_path, {**V2, "nccl": "2.28.99-1+cuda13.0"})
    message = str(failed.value)
    assert "nccl_version=2.28.99-1+cuda13.0" in message
    assert "2.28.9-1+cuda13.0" in message and "2.28.3-1+cuda13.0" in message
    assert set(failed.value.nodes) == {name for name, _ in info.nodes}
    for ip in ips:  # nothing changed by the failed run
        assert _versions(info, ip)["libnccl2"] == V2["nccl"]
