"""Helpers shared by the unit tests (imported as ``helpers``: pytest puts this directory
on sys.path). Not collected: the file name does not start with test_."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
BIN = Path(sys.executable).parent
TINY = tomllib.loads((REPO / "trainer" / "configs" / "tiny.toml").read_text())


def run_bench(tmp_path: Path, script: str, *args: str, out: str | None = None
              ) -> tuple[subprocess.CompletedProcess, dict]:
    """``bench/<script>`` on this machine's CPU (any GPU hidden from it), run in
    ``tmp_path`` with ``args`` and ``--out`` there (``out``, else the script's name as
    .json): the finished process, which must have exited 0, and the JSON it wrote."""
    path = tmp_path / (out or Path(script).with_suffix(".json").name)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args,
                           "--out", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(path.read_text())


TINY_CONFIG = str(REPO / "trainer" / "configs" / "tiny.toml")


def tool(name: str) -> str:
    """The path of a dev tool in this virtualenv; the test is skipped, saying what to
    install, when the tool is missing."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {BIN} (pip install -e .[dev])")
    return str(path)


def node_module(path: Path):
    """Import an Ansible module of the repo (``library/x.py``, ``roles/r/library/x.py``) in
    this process, with the repo's module_utils importable the way Ansible ships them
    (``ansible.module_utils.<name>``)."""
    import importlib.util

    import ansible.module_utils

    if str(REPO / "module_utils") not in ansible.module_utils.__path__:
        ansible.module_utils.__path__.append(str(REPO / "module_utils"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_role(tmp_path: Path, role: str, extra: dict, playbook: Path | None = None,
             host_vars: dict | None = None) -> subprocess.CompletedProcess:
    """``ansible-playbook --check`` of one role (or of ``playbook``) against this machine
    through a local connection, with ``extra`` as extra vars."""
    play = playbook or tmp_path / "play.yml"
    if playbook is None:
        play.write_text(yaml.safe_dump([{
            "name": "Run one role", "hosts": "nodes", "gather_facts": False,
            "roles": [{"role": role}],
        }]))
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            **(host_vars or {})}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump(
        {"all": {"children": {"nodes": {"hosts": {"localnode": host}}}}}))
    (tmp_path / "extra.yml").write_text(yaml.safe_dump(extra))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROLES), ANSIBLE_LOCAL_TEMP=str(tmp_path / "ltmp"),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / "rtmp"), ANSIBLE_NOCOLOR="1")
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play),
                           "--check", "-e", f"@{tmp_path / 'extra.yml'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def run_play(work: Path, variables: dict) -> None:
    """``ansible-playbook`` of ``work``/play.yml against ``work``/hosts.yml, with
    ``variables`` as extra vars (written to ``work``/extra.yml); asserts it succeeded."""
    (work / "extra.yml").write_text(yaml.safe_dump(variables))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(work / "ltmp"))
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(work / "hosts.yml"),
                           str(work / "play.yml"), "-e", f"@{work / 'extra.yml'}"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def dump_toml(doc: dict) -> str:
    """Enough TOML for the trainer's configs: tables of scalars."""
    lines = []
    for table, values in doc.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
        lines.append("")
    return "\n".join(lines)


def tiny_doc(**sections) -> dict:
    """tiny.toml's tables with ``sections`` merged into them (a copy)."""
    doc = copy.deepcopy(TINY)
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    return doc


def tiny_config(tmp: Path, name: str, **sections) -> Path:
    """tiny.toml with ``sections`` merged into its tables, written to tmp/<name>.toml."""
    path = tmp / f"{name}.toml"
    path.write_text(dump_toml(tiny_doc(**sections)))
    return path


@contextlib.contextmanager
def umask(mask: int):
    """Run the block under ``mask`` (a permissive one shows what follows the umask)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def loose_paths(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Paths under ``root`` (and root) that group or others may read, write or enter,
    with their modes; names in ``skip`` are not descended into."""
    import stat

    loose = []
    for path in [root, *sorted(root.rglob("*"))]:
        rel = path.relative_to(root)
        if any(part in skip for part in rel.parts) or path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            loose.append(f"{rel} {mode:04o}")
    return loose


def first_node_transport(first: str, marker: str):
    """A local transport that starts ``first``'s command a second before the other
    nodes' (those whose command line contains ``marker``), so that its torchrun has the
    lowest PID: c10d gives rank 0 to the node whose address sorts first, then to the
    lowest PID, and local "nodes" share one address. (The rendezvous stays node1's:
    joblaunch.rdzv_conf.)"""
    from dsk_provision.remote import LocalTransport

    class FirstNode(LocalTransport):
        def popen(self, node, command: str, *, stdin=None):
            if node.name != first and marker in command:
                command = f"sleep 1 && {command}"
            return super().popen(node, command, stdin=stdin)

    return FirstNode()


def free_port() -> int:
    """A loopback TCP port nothing listens on, for a rendezvous or a server of a test.
    Chosen outside the kernel's range for the local ports of outgoing connections
    (ip_local_port_range): a port from that range, free when asked, can be taken a moment
    later by any process's connection (torchrun's, a parallel test's) before the test
    binds it."""
    import random
    import socket

    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range")
                     .read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    below = list(range(20000, min(low, 30000)))
    candidates = below or list(range(high + 1, 65536))
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port outside the ephemeral range")



def fake_nccl_last(library) -> tuple[list[int], int]:
    """What the stand-in NCCL (fixtures/fake_nccl.c) saw in its last ncclAllReduce: send,
    recv, count, datatype, op, stream, the communicator's tag, the number of calls so far;
    and how many communicators are open."""
    import ctypes

    out = (ctypes.c_longlong * 8)()
    fn = library.lib.fake_last
    fn.argtypes, fn.restype = [ctypes.POINTER(ctypes.c_longlong)], ctypes.c_int
    live = fn(out)
    return list(out), live
