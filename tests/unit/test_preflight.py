"""The checks before a launch: the rendezvous address, the trainer's modules, the GPUs,
probed on "nodes" that are local processes running this machine's Python."""

from __future__ import annotations

import ast
import socket
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from dsk_provision import launch, preflight, preflight_probe
from dsk_provision.errors import RunFailed
from dsk_provision.inventory import Inventory, Node
from trainer.config import load_config
from trainer.imports import ALWAYS, modules_for

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"
# How long the probes try to reach the rendezvous, as in production: on a loaded machine a
# peer may start its probe seconds before the first node listens.
WAIT_S = 10.0


def inventory(tmp_path: Path, nodes: list[tuple[str, str, dict]], *, port: int | None = None,
              connection: str = "local") -> Inventory:
    base = {"dsk_root": str(tmp_path / "root"), "dsk_python": sys.executable,
            "dsk_rdzv_port": port or free_port(), "ansible_connection": connection}
    built = [Node(name, address, 22, None, 0, {**base, **extra})
             for name, address, extra in nodes]
    hosts = tmp_path / "hosts.yml"
    return Inventory(path=hosts, nodes=built, vars=base, hosts_file=hosts)


def resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, 1)
    except OSError:
        return False
    return True


def check(inv: Inventory, modules: list[str], **kwargs):
    return preflight.check_nodes(inv, modules, ranks={n.name: 1 for n in inv.nodes},
                                 wait_s=WAIT_S, timeout_s=120, **kwargs)


# ---------------------------------------------------------------------- rendezvous address


def test_one_node_on_a_local_connection_rendezvouses_on_loopback(tmp_path):
    # a node named h200 without ansible_host: its address is its name, which no resolver
    # needs to know for a job that never leaves the machine
    inv = inventory(tmp_path, [("h200", "h200", {})], port=29500)
    assert launch.rendezvous_endpoint(inv) == "127.0.0.1:29500"
    argv = launch.torchrun_argv(inv, 0, "m", [], run_id="r")
    assert argv[argv.index("--rdzv_endpoint") + 1] == "127.0.0.1:29500"


def test_other_clusters_rendezvous_on_the_first_nodes_address(tmp_path):
    ssh = inventory(tmp_path, [("h200", "10.0.0.5", {})], port=29500, connection="ssh")
    assert launch.rendezvous_endpoint(ssh) == "10.0.0.5:29500"
    two = inventory(tmp_path, [("a", "10.0.0.5", {}), ("b", "10.0.0.6", {})], port=29500)
    assert launch.rendezvous_endpoint(two) == "10.0.0.5:29500"


def test_the_local_h200_node_passes(tmp_path):
    inv = inventory(tmp_path, [("h200", "h200", {})])
    started = time.monotonic()
    [result] = check(inv, ["json"])
    assert result.problems == []
    assert result.report["resolved"] == ["127.0.0.1"]
    assert "connect_error" not in result.report
    assert time.monotonic() - started < 60


def test_an_address_that_does_not_resolve_is_named_on_every_node(tmp_path):
    name = "dsk-no-such-node.invalid"
    if resolves(name):
        pytest.skip(f"{name} resolves on this machine")
    inv = inventory(tmp_path, [(name, name, {}), ("node2", "127.0.0.2", {})])
    started = time.monotonic()
    with pytest.raises(RunFailed) as err:
        check(inv, ["json"])
    assert time.monotonic() - started < 60
    assert err.value.nodes == [name, "node2"]
    text = str(err.value)
    for node in (name, "node2"):
        assert f"  {node}: the rendezvous address {name} does not resolve here" in text
    assert f"set ansible_host of {name}" in text


def test_a_rendezvous_port_in_use_is_named(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        inv = inventory(tmp_path, [("node1", "127.0.0.1", {}), ("node2", "127.0.0.1", {})],
                        port=port)
        with pytest.raises(RunFailed) as err:
            check(inv, ["json"])
    assert err.value.nodes == ["node1"]
    assert f"node1: cannot listen on the rendezvous port {port} (port {port} is in use)" \
        in str(err.value)


def test_connect_reports_a_refused_connection():
    port = free_port()  # nothing listens there any more
    until = time.monotonic() + 0.5
    why = preflight_probe.connect([(socket.AF_INET, ("127.0.0.1", port))], until)
    assert why == "Connection refused"
    assert time.monotonic() - until < 1


# ---------------------------------------------------------------------- modules, GPUs


def test_a_node_without_a_trainer_module_is_named(tmp_path):
    # node2's Python runs without its site-packages: jsonschema is missing there
    wrapper = tmp_path / "bare-python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    inv = inventory(tmp_path, [("node1", "127.0.0.1", {}),
                               ("node2", "127.0.0.1", {"dsk_python": str(wrapper)})])
    with pytest.raises(RunFailed) as err:
        check(inv, ["json", "jsonschema"])
    assert err.value.nodes == ["node2"]
    assert (f"node2: {wrapper} cannot import jsonschema (No module named 'jsonschema')"
            in str(err.value))
    assert "bootstrap" in err.value.hint


def test_a_node_whose_python_does_not_run_is_named(tmp_path):
    inv = inventory(tmp_path, [("node1", "127.0.0.1", {}),
                               ("node2", "127.0.0.1", {"dsk_python": "/nonexistent/python"})])
    with pytest.raises(RunFailed) as err:
        check(inv, ["json"])
    assert err.value.nodes == ["node2"]
    assert "node2: its Python /nonexistent/python does not run the check" in str(err.value)


def test_a_dependency_missing_inside_a_module_is_not_called_the_module_missing(tmp_path):
    package = tmp_path / "lib" / "brokenmod"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import dsk_absent_dependency\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "lib"} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    inv = inventory(tmp_path, [("node1", "127.0.0.1", {"dsk_python": str(wrapper)})])
    with pytest.raises(RunFailed) as err:
        check(inv, ["brokenmod"])
    assert ("cannot import brokenmod (ModuleNotFoundError: No module named "
            "'dsk_absent_dependency')") in str(err.value)


def _judge(report: dict, **kwargs) -> list[str]:
    node = Node("gpu1", "10.0.0.1", 22, None, 8, {})
    args = {"host": "10.0.0.1", "port": 29500, "first": "gpu1", "serve": True, "ranks": 8,
            "gpus": 8, "ssh": True, "timeout_s": 120.0, **kwargs}
    line = preflight.MARKER + __import__("json").dumps(report)
    return preflight.judge(node, 0, f"noise\n{line}\n", **args).problems


def test_too_few_gpus_and_a_foreign_rendezvous_address_are_named():
    assert _judge({"cuda_devices": 8, "hosts_rendezvous": True, "import_errors": {}}) == []
    [gpus] = _judge({"cuda_devices": 6, "import_errors": {}})
    assert gpus == "8 ranks need 8 GPUs, but its Python sees 6"
    [host] = _judge({"hosts_rendezvous": False, "hostname": "gpu1", "import_errors": {}})
    assert "would not host the rendezvous: 10.0.0.1 is not one of gpu1's own" in host
    # a CPU node's ranks need no device
    assert _judge({"cuda_devices": 0, "import_errors": {}}, gpus=0) == []


def test_ssh_that_cannot_connect_and_a_probe_that_hangs():
    node = Node("n1", "10.0.0.1", 22, None, 0, {})
    args = {"host": "10.0.0.1", "port": 29500, "first": "n1", "serve": True, "ranks": 1,
            "gpus": 0, "ssh": True, "timeout_s": 120.0}
    ssh = preflight.judge(node, 255, "ssh: connect to host 10.0.0.1 port 22: No route\n",
                          **args)
    assert ssh.problems == ["ssh could not connect (ssh: connect to host 10.0.0.1 port 22: "
                            "No route)"]
    assert preflight.judge(node, 124, "", **args).problems == ["no answer within 120 s"]


# ---------------------------------------------------------------------- the trainer's needs


def test_modules_follow_the_config(tmp_path):
    cfg = load_config(TINY)
    assert modules_for(cfg) == ["torch", "numpy", "jsonschema"]
    cfg.metrics.tensorboard = True
    cfg.training.fp8 = "tensorwise"
    assert modules_for(cfg) == ["torch", "numpy", "jsonschema", "tensorboard", "torchao"]


# Modules a training run does not load: other entry points, and the node probes.
NOT_TRAINING = {"convert.py", "prepare.py", "imports.py"}
NOT_TRAINING_DIRS = {"probes", "bench"}
# Imported only when the config asks for them (modules_for adds them then).
CONDITIONAL = {"torchao"}
# Imported where installed, and done without where not: Triton comes with torch's GPU
# wheels, and without it the routed experts' SwiGLU is the plain expression
# (trainer/model/swiglu.py).
OPTIONAL = {"triton"}


def test_every_module_training_imports_is_checked():
    roots = set()
    for path in (REPO / "trainer").rglob("*.py"):
        rel = path.relative_to(REPO / "trainer")
        if rel.name in NOT_TRAINING or set(rel.parts[:-1]) & NOT_TRAINING_DIRS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    third_party = {r for r in roots
                   if r not in sys.stdlib_module_names and r not in ("trainer", "dsk_provision")}
    assert third_party - CONDITIONAL - OPTIONAL <= set(ALWAYS), third_party


def test_optional_modules_are_imported_only_under_an_import_error_guard():
    guarded, unguarded = set(), []
    for path in (REPO / "trainer").rglob("*.py"):
        tree = ast.parse(path.read_text())
        inside = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                                  "ModuleNotFoundError")
                    for h in node.handlers):
                inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and node.level == 0 else [])
            for name in names:
                if name.split(".")[0] in OPTIONAL:
                    (guarded.add(path.name) if id(node) in inside
                     else unguarded.append(f"{path.name}:{node.lineno}"))
    assert unguarded == [], unguarded
    assert guarded, "no optional import found: is OPTIONAL out of date?"
