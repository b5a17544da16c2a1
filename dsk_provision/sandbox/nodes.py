"""Sandbox nodes: an overlay over the base image, per-node identity, systemd-nspawn."""

from __future__ import annotations

import secrets
import socket
import tempfile
import time
from pathlib import Path

from dsk_provision.defaults import resolve
from dsk_provision.errors import EnvironmentProblem

from . import naming, nodefs
from .host import run, spawn_detached


def node_paths(state_dir: Path, node: str) -> dict[str, Path]:
    base = state_dir / "nodes" / node
    return {"base": base, "upper": base / "upper", "work": base / "work", "root": base / "root"}


def mounted_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first."""
    prefix = str(path.resolve()).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if mp == prefix or mp.startswith(prefix + "/"):
            found.append(mp)
    return sorted(set(found), key=len, reverse=True)


def unmount_all(path: Path) -> None:
    for mp in mounted_under(path):
        if run(["umount", mp], check=False).returncode != 0:
            run(["umount", "-l", mp])


def mount_overlay(lower: Path, state_dir: Path, node: str) -> Path:
    p = node_paths(state_dir, node)
    for d in ("upper", "work", "root"):
        p[d].mkdir(parents=True, exist_ok=True)
    if not mounted_under(p["root"]):
        run(["mount", "-t", "overlay", f"dsk-{node}", "-o",
             f"lowerdir={lower},upperdir={p['upper']},workdir={p['work']}", str(p["root"])])
    return p["root"]


def write_identity(root: Path, node: str, hosts_text: str, authorized_key: str) -> str:
    """Hostname, hosts, machine-id, root's authorized key and the SSH host key.

    The host key is generated here, on the host, before the first boot, so that the
    sandbox can pin it; a node that already has one keeps it. Returns the public key.
    A kept node disk is the node's to change, so all of this goes through nodefs, which
    follows no link the node may have left in place of a file or directory.
    """
    nodefs.write_file(root, "etc/hostname", node + "\n")
    nodefs.write_file(root, "etc/hosts", hosts_text)
    if not (nodefs.read_file(root, "etc/machine-id") or b"").strip():
        nodefs.write_file(root, "etc/machine-id", secrets.token_hex(16) + "\n", 0o444)
    nodefs.make_dir(root, "root/.ssh", 0o700)
    nodefs.write_file(root, "root/.ssh/authorized_keys", authorized_key.strip() + "\n", 0o600)
    key_path = "etc/ssh/ssh_host_ed25519_key"
    pub = nodefs.read_file(root, key_path + ".pub")
    if not nodefs.chmod_file(root, key_path, 0o600) or pub is None or len(pub.split()) < 2:
        # Made in a private directory of the host, then copied in.
        with tempfile.TemporaryDirectory(prefix="dsk-hostkey-") as tmp:
            key = Path(tmp) / "key"
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node}",
                 "-f", str(key)])
            pub = Path(f"{key}.pub").read_bytes()
            nodefs.write_file(root, key_path, key.read_bytes(), 0o600)
        nodefs.write_file(root, key_path + ".pub", pub, 0o644)
    parts = pub.decode(errors="replace").split()
    return f"{parts[0]} {parts[1]}"


def node_venv() -> str:
    """Where the nodes expect the trainer's virtualenv: the directory of dsk_python's
    default (roles/dsk_defaults), which the sandbox fills with the host's .venv."""
    return str(Path(resolve("dsk_python")).parent.parent)


def start(name: str, node: str, root: Path, venv: Path, state_dir: Path) -> int:
    machine = naming.machine_name(name, node)
    cmd = ["systemd-nspawn", "-q", "-D", str(root), "--boot", "--keep-unit", "--register=no",
           f"--machine={machine}", f"--hostname={node}",
           f"--network-namespace-path=/run/netns/{naming.netns_name(name, node)}",
           "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=passive",
           f"--bind-ro={venv}:{node_venv()}"]
    return spawn_detached(cmd, state_dir / "logs" / f"{node}.log",
                          state_dir / "logs" / f".{node}.pid")


def ssh_answers(ip: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((ip, 22), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_ssh(nodes: list[tuple[str, str]], timeout: float, state_dir: Path) -> None:
    pending = dict(nodes)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for node, ip in list(pending.items()):
            if ssh_answers(ip):
                del pending[node]
        if pending:
            time.sleep(0.2)
    if pending:
        names = ", ".join(f"{n} ({ip})" for n, ip in pending.items())
        raise EnvironmentProblem(
            f"sshd did not answer within {timeout:.0f} s on {names}",
            hint=f"see {state_dir / 'logs'}/<node>.log; the sandbox is left as it is for "
                 "inspection; `dsk-provision sandbox down` removes it")
