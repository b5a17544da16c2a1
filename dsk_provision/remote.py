"""Commands and files on the nodes: transports, run a command, fetch and put files.

A transport turns a shell command line for a node into a local process: OpenSSH with the
inventory's user, port, key and arguments, host keys pinned (never turned off), or a
local shell for ``ansible_connection: local``. Anything with ``argv(node, command)`` and
``popen(node, command, stdin=...)`` is a transport, so tests can run "nodes" as local
processes. launch (torchrun) and validation (benchmarks, nccl-tests) both go through here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from dsk_provision import ssh_options
from dsk_provision.errors import EnvironmentProblem, InputError, RunFailed
from dsk_provision.files import make_private_dir, open_private


def _var(node, name: str, default: Any = None) -> Any:
    value = (node.vars or {}).get(name)
    return default if value is None else value


def inventory_file(inventory) -> str | None:
    """The inventory's path for error messages, when it has one."""
    path = getattr(inventory, "path", None)
    return str(path) if path else None


def host_field(node, name: str) -> str:
    """The dotted field of a node's variable, for error messages."""
    return f"all.children.nodes.hosts.{node.name}.{name}"


def find_node(inventory, node):
    """A Node from a Node or a node name."""
    if not isinstance(node, str):
        return node
    for candidate in inventory.nodes:
        if candidate.name == node:
            return candidate
    raise InputError(f"no node named {node!r} in the inventory", file=inventory_file(inventory),
                     field="all.children.nodes.hosts")


# --------------------------------------------------------------------------- transports


class Transport(Protocol):
    def argv(self, node, command: str) -> list[str]:
        """The local argv that runs a shell command line on the node."""

    def popen(self, node, command: str, *, stdin=None) -> subprocess.Popen:
        """Start the command on the node; stdout and stderr merged, text lines."""


class SshTransport:
    """OpenSSH with the inventory's user, port, key and common args; host keys pinned."""

    def __init__(self, inventory=None, ssh: str = "ssh"):
        self.inventory = inventory
        self.ssh = ssh

    def options(self, node) -> list[str]:
        file = inventory_file(self.inventory)
        cluster_vars = getattr(self.inventory, "vars", None) or node.vars or {}
        problems = ssh_options.node_ssh_problems(
            node.vars or {}, ssh_options.declared_known_hosts(cluster_vars))
        if problems:
            name, why = problems[0]
            raise InputError(why, file=file, field=host_field(node, name))
        args: list[str] = []
        keys: set[str] = set()
        for name in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
            parsed = ssh_options.parse_args(str(_var(node, name, "")))
            args += parsed.tokens
            keys |= parsed.keywords()
        # Non-interactive, pinned, and quick to notice a dead node; options given first
        # win in ssh, so the inventory's own values (already vetted above) come first.
        extra = ["-o", "BatchMode=yes"]
        if "stricthostkeychecking" not in keys:
            extra += ["-o", "StrictHostKeyChecking=yes"]
        # ConnectTimeout and the keep-alives: ansible.cfg's, so that Ansible and the
        # launcher give up on a dead node alike.
        for key, option in ssh_options.control_node_ssh_options().items():
            if key not in keys:
                extra += ["-o", option]
        key_file = _var(node, "ansible_ssh_private_key_file")
        out = list(args) + extra
        if key_file:
            if not Path(str(key_file)).expanduser().is_file():
                raise InputError(f"private key {key_file} does not exist", file=file,
                                 field=host_field(node, "ansible_ssh_private_key_file"))
            out += ["-i", str(Path(str(key_file)).expanduser()), "-o", "IdentitiesOnly=yes"]
        port = node.port or _var(node, "ansible_port")
        if port:
            out += ["-p", str(port)]
        user = node.user or _var(node, "ansible_user")
        if user:
            out += ["-l", str(user)]
        return out

    def argv(self, node, command: str) -> list[str]:
        return [self.ssh, *self.options(node), str(node.address), command]

    def popen(self, node, command: str, *, stdin=None) -> subprocess.Popen:
        return _popen(self.argv(node, command), stdin)


class LocalTransport:
    """Runs the node's commands on this machine (``ansible_connection: local``)."""

    def argv(self, node, command: str) -> list[str]:
        return ["bash", "-c", command]

    def popen(self, node, command: str, *, stdin=None) -> subprocess.Popen:
        return _popen(self.argv(node, command), stdin)


def _popen(argv: list[str], stdin) -> subprocess.Popen:
    # Each client gets its own session: a Ctrl-C at the terminal reaches this process
    # only, which then stops the remote side in order; a client killed along with us
    # would leave the remote command running with nobody to stop it.
    try:
        return subprocess.Popen(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, errors="replace", start_new_session=True)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"cannot run {argv[0]}: not installed",
                                 hint="install openssh-client") from exc


def transport_for(inventory, node) -> Transport:
    """SSH unless the node says ansible_connection: local."""
    connection = str(_var(node, "ansible_connection", "ssh"))
    if connection == "local":
        return LocalTransport()
    if connection in ("ssh", "smart", "paramiko"):
        return SshTransport(inventory)
    raise InputError(f"connection {connection!r} cannot run commands on the node; use ssh "
                     "or local", file=inventory_file(inventory),
                     field=host_field(node, "ansible_connection"))


# A transport, a function (inventory, node) -> transport, or None for transport_for.
TransportChoice = Transport | Callable[[Any, Any], Transport] | None


def resolve_transport(choice: TransportChoice, inventory, node) -> Transport:
    """The transport to reach ``node``: the given one, the factory's, or transport_for."""
    if choice is None:
        return transport_for(inventory, node)
    if hasattr(choice, "popen"):
        return choice  # type: ignore[return-value]
    return choice(inventory, node)


# --------------------------------------------------------------------------- commands, files


def run_command(transport: Transport, node, command: str, *, stdin=None,
        timeout: float = 120.0) -> tuple[int, str]:
    """Run a command on a node and wait: (exit code, merged output); 124 on timeout."""
    proc = transport.popen(node, command, stdin=stdin)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return 124, out
    except BaseException:
        proc.kill()  # interrupted: the client has its own session and would outlive us
        proc.wait()
        raise
    return proc.returncode, out


def on_nodes(inventory, nodes, command: Callable[[Any], str], *, timeout: float,
             transport: TransportChoice = None) -> dict[str, tuple[int, str]]:
    """Run a command on each node at once; {node: (exit code, output)}; 124: no answer
    within ``timeout``; 255 with ssh: could not connect."""
    results: dict[str, tuple[int, str]] = {}

    def one(node):
        try:
            results[node.name] = run_command(resolve_transport(transport, inventory, node),
                                             node, command(node), timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported per node
            results[node.name] = (1, f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def put_tar(transport: Transport, node, tar_path: Path, remote_dir: PurePosixPath | str, *,
            timeout: float = 120.0) -> tuple[int, str]:
    """Unpack a local tar file into ``remote_dir`` on the node (created when missing)."""
    remote = shlex.quote(str(remote_dir))
    with open(tar_path, "rb") as fh:
        return run_command(transport, node, f"mkdir -p {remote} && tar -x -m -C {remote}", stdin=fh,
                   timeout=timeout)


FETCH_TIMEOUT_S = 300.0


def fetch(inventory, node, remote_path, local_path, *, transport: TransportChoice = None,
          timeout: float = FETCH_TIMEOUT_S) -> Path:
    """Copy one file from a node; written whole (temp + rename), or not at all. Raises
    RunFailed naming the node when the copy fails or takes longer than ``timeout``."""
    node = find_node(inventory, node)
    local_path = Path(local_path)
    make_private_dir(local_path.parent)
    proc = resolve_transport(transport, inventory, node)
    argv = proc.argv(node, f"cat -- {shlex.quote(str(remote_path))}")
    tmp = local_path.with_name(f".{local_path.name}.part")
    try:
        with open_private(tmp, "wb") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise RunFailed(f"could not fetch {remote_path} from {node.name}: no answer within "
                        f"{timeout:g} s", nodes=[node.name],
                        hint=f"check that {node.name} is up and reachable") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise RunFailed(f"could not fetch {remote_path} from {node.name}: "
                        f"{reason[-1] if reason else 'exit ' + str(result.returncode)}",
                        nodes=[node.name])
    os.replace(tmp, local_path)
    return local_path


__all__ = [
    "LocalTransport", "SshTransport", "Transport", "TransportChoice", "fetch", "find_node",
    "on_nodes", "put_tar", "resolve_transport", "run_command", "transport_for",
]
