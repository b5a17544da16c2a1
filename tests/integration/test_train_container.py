"""train --container across the bootstrapped 3-node sandbox: a missing image is named per
node before torchrun starts; with the image on every node, every rank runs in a podman
container and the loss falls; nothing of the job's containers is left afterwards.

No registry is reachable from the sandbox: the image is made on each node from the node's
own Python and trainer environment (``podman import`` of a tarball), then removed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dsk_provision import containers
from dsk_provision.errors import RunFailed
from dsk_provision.inventory import load_inventory
from dsk_provision.joblaunch import train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"
IMAGE = "localhost/dsk-itest-trainer:1"
JOB = "ctr-itest"

# The image: the node's interpreter and libraries, and of the trainer environment the
# packages that `import torch, numpy, jsonschema` and torch.distributed load (whole
# top-level packages, with the shared libraries bundled beside them).
_BUILD = r"""
set -e
py=@PYTHON@
sp=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv=$($py -c 'import sys; print(sys.prefix)')
pkgs=$($py - <<'EOF'
import os, sys, sysconfig
import jsonschema, numpy, torch, torch.distributed.run, torch.distributed.checkpoint
import torch.distributed.fsdp, torch.distributed.tensor.parallel, torch.distributed.pipelining
sp = sysconfig.get_paths()["purelib"]
tops = {n for n in os.listdir(sp) if n.endswith(".libs")}
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    if f.startswith(sp + "/"):
        tops.add(f[len(sp) + 1:].split("/")[0])
print(" ".join(sorted(tops)))
EOF
)
stdlib=$($py -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
real=$(readlink -f $py)
list=$(mktemp)
{ for p in $pkgs; do echo "${sp#/}/$p"; done
   echo "${venv#/}/bin"; echo "${venv#/}/pyvenv.cfg"; echo "${stdlib#/}"
   echo "${real#/}"; echo usr/bin/python3; echo usr/lib/x86_64-linux-gnu; echo usr/lib64
   echo bin; echo lib; echo lib64; echo sbin; echo usr/bin/sh; echo usr/bin/dash
   echo etc/passwd; echo etc/group; echo etc/nsswitch.conf; } > $list
tar -C / --exclude='torch/include' --exclude='torch/test' -cf - -T $list \
    | podman import -q - @IMAGE@ >/dev/null
rm -f $list
"""


def _on_all(nodes, node_ssh, command: str, timeout: float = 600) -> dict[str, object]:
    results: dict[str, object] = {}

    def one(name, ip):
        results[name] = node_ssh(ip, command, check=False, timeout=timeout)

    threads = [threading.Thread(target=one, args=n) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# The image is copied whole for each container by the sandbox's vfs storage: building it
# on three nodes and starting two containers on each takes minutes on a loaded machine.
@pytest.mark.timeout(900, func_only=True)
def test_train_in_a_container(bootstrapped_cluster, node_ssh, tmp_path):
    bootstrapped_cluster.require_success()
    info = bootstrapped_cluster.info
    inventory = load_inventory(info.inventory_path)
    python = inventory.nodes[0].settings.python
    job_dirs = {n.name: n.settings.job_dir(JOB) for n in inventory.nodes}
    cname = containers.container_name(JOB)
    try:
        # No image anywhere (and no registry to pull from): every node is named, and no
        # torchrun was started.
        with pytest.raises(RunFailed) as err:
            train(inventory, TINY, runs_dir=tmp_path / "missing", name=JOB,
                  container=IMAGE, timeout_s=300)
        assert sorted(err.value.nodes) == ["node1", "node2", "node3"]
        assert f"image {IMAGE}: not on this node and cannot be pulled" in str(err.value)
        for name, ip in info.nodes:
            proc = node_ssh(ip, "pgrep -af '[t]orch[.]distributed[.]run'", check=False)
            assert proc.stdout.strip() == "", f"torchrun started on {name}"

        build = _BUILD.replace("@PYTHON@", python).replace("@IMAGE@", IMAGE)
        built = _on_all(info.nodes, node_ssh, build)
        for name, proc in built.items():
            assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"

        result = train(inventory, TINY, runs_dir=tmp_path / "runs", name=JOB,
                       container=IMAGE, timeout_s=600)
        assert result.world_size == 3
        assert result.last_loss < result.first_loss
        # Every rank says where it runs (trainer/jobstate.py); the runtime's client was
        # torchrun's parent on each node.
        for name, ip in info.nodes:
            logs = node_ssh(ip, f"cat {job_dirs[name]}/logs/rank-*.log").stdout
            assert "in a podman container" in logs, f"{name}:\n{logs[-2000:]}"
            node_log = node_ssh(ip, f"cat {job_dirs[name]}/logs/node-{name}.log").stdout
            assert f"podman run --rm --name {cname} --network host" in node_log
            left = node_ssh(ip, "podman ps -a --filter name=dsk- --format '{{.Names}}'"
                            ).stdout.split()
            assert left == [], f"containers left on {name}: {left}"
    finally:
        _on_all(info.nodes, node_ssh,
                f"podman rm -f {cname} dsk-preflight-node1 dsk-preflight-node2 "
                f"dsk-preflight-node3 >/dev/null 2>&1; podman rmi -f {IMAGE} >/dev/null 2>&1; "
                f"rm -rf {job_dirs[info.nodes[0][0]]}", timeout=120)
