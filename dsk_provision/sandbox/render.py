"""Text files the sandbox writes: inventory, /etc/hosts, known_hosts. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from dsk_provision.defaults import resolve


def ssh_common_args(known_hosts: Path, control_dir: Path) -> str:
    # ControlPath lives in the state dir so that `down` can close every master
    # connection before it removes the network namespaces.
    return (f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
            f"-o ControlMaster=auto -o ControlPath={control_dir}/%C -o ControlPersist=60s")


def render_inventory(*, cluster_name: str, nodes: Sequence[tuple[str, str]], key_file: Path,
                     known_hosts: Path, control_dir: Path, mirror_url: str,
                     mirror_key_fingerprint: str = "") -> str:
    """The sandbox's inventory, in the format of docs/architecture.md; nodes trust the
    mirror's key by `mirror_key_fingerprint` (the control node's record of it)."""
    doc = {
        "all": {
            "vars": {
                "dsk_cluster_name": cluster_name,
                "dsk_profile": "cpu-sandbox",
                "dsk_gpus_per_node": 0,
                # The cluster defaults, written out so that the file shows them.
                "dsk_root": resolve("dsk_root"),
                "dsk_python": resolve("dsk_python"),
                "dsk_rdzv_port": resolve("dsk_rdzv_port"),
                "dsk_socket_ifname": "eth0",
                "dsk_nccl_env": resolve("dsk_nccl_env"),
                "dsk_mirror_url": mirror_url,
                **({"dsk_mirror_key_fingerprint": mirror_key_fingerprint}
                   if mirror_key_fingerprint else {}),
                # Daemonless, so it needs nothing from the node's cgroup setup; its
                # default overlay storage cannot stack on the nodes' overlayfs root.
                "containers_runtime": "podman",
                "containers_podman_storage_driver": "vfs",
                # The nodes are containers themselves: the kernel gives podman's
                # containers neither a session keyring nor cgroups of their own there.
                "containers_podman_nested": True,
                # For Slurm when dsk_slurm_enabled is turned on (roles/slurm): the nodes
                # share the host's cgroup tree, which is not theirs to manage, so slurmd
                # finds a job's processes through /proc and confines nothing.
                "slurm_proctrack_type": "proctrack/linuxproc",
                "slurm_task_plugin": "task/none",
                "slurm_jobacct_gather_type": "jobacct_gather/none",
                "ansible_user": "root",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_ssh_private_key_file": str(key_file),
                "ansible_ssh_common_args": ssh_common_args(known_hosts, control_dir),
            },
            "children": {
                "nodes": {"hosts": {n: {"ansible_host": ip} for n, ip in nodes}},
            },
        },
    }
    header = (f"# dsk-provision sandbox '{cluster_name}': written by `sandbox up`, "
              "rewritten when nodes change.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000)


def render_etc_hosts(name: str, nodes: Sequence[tuple[str, str]]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"# dsk-provision sandbox {name}"]
    lines += [f"{ip}\t{node}" for node, ip in nodes]
    return "\n".join(lines) + "\n"


def render_known_hosts(entries: Sequence[tuple[str, str, str]]) -> str:
    """entries: (node name, ip, public host key 'type base64') -> pinned known_hosts lines."""
    return "".join(f"{node},{ip} {key}\n" for node, ip, key in entries)
