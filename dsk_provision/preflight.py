"""Checks before torchrun starts, so that what would stall a rendezvous, end a rank in a
traceback or run a GPU out of memory is named in seconds, with the node.

Before any connection (check_memory): the trainer's memory estimate per GPU for the
config's layout (trainer/memory.py) against the GPUs' memory in the inventory's hardware
profile; a layout that cannot fit is refused with the estimate and the nearest layout
that fits.

One probe per node, all at once (dsk_provision/preflight_probe.py, run by the node's
trainer Python):

- the rendezvous address resolves on every node and a TCP connection to it opens (the
  first node listens on the rendezvous port meanwhile, as c10d's store will), and on the
  first node torch's own rule agrees that the address is the node's own (otherwise no
  node hosts the store and every rank waits until c10d times out);
- every module the trainer imports for this config imports;
- a node whose ranks use GPUs sees at least as many CUDA devices as it starts ranks.

The rendezvous address is the first node's address, except for a cluster of one node
reached by a local connection: that node rendezvouses with itself on loopback, whatever
its name says (a name that only the inventory knows never resolves).
"""

from __future__ import annotations

import json
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dsk_provision.addresses import host_port
from dsk_provision.containers import IMAGE_MARKER  # what the image check says before it fails
from dsk_provision.errors import RunFailed
from dsk_provision.preflight_probe import MARKER  # what the probe prints before its JSON
from dsk_provision.remote import SshTransport, TransportChoice, resolve_transport, run_command

PROBE = Path(__file__).with_name("preflight_probe.py")
LOOPBACK = "127.0.0.1"
# How long each node keeps trying to reach the rendezvous address: the probes start at
# once, but the first node's listener may come up a few seconds after a peer's attempt.
CONNECT_S = 10.0
# Beyond that: starting the interpreter and importing torch on a cold node.
PROBE_TIMEOUT_S = 120.0


def _connection(node) -> str:
    return str((node.vars or {}).get("ansible_connection") or "ssh")


def rendezvous_host(inventory) -> str:
    """The address every node's torchrun is given for the c10d rendezvous."""
    first = inventory.nodes[0]
    if len(inventory.nodes) == 1 and _connection(first) == "local":
        return LOOPBACK
    return str(first.address)


def rendezvous_endpoint(inventory) -> str:
    """``host:port`` of the rendezvous (IPv6 in brackets)."""
    return host_port(rendezvous_host(inventory), inventory.nodes[0].settings.rdzv_port)


@dataclass
class NodeCheck:
    """What one node's probe found; ``problems`` in words, empty when all is well."""

    name: str
    problems: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def probe_command(node, *, host: str, port: int, serve: bool, peers: int,
                  modules: list[str], gpus: int, wait_s: float,
                  container: str | None = None) -> str:
    """The shell line that runs the probe (sent on stdin) with the node's Python; with
    ``container``, in that image as the job will run (the image is looked for first, and
    pulled when missing)."""
    argv = [node.settings.python, "-", "--host", host, "--port", str(port),
            "--peers", str(peers), "--wait", f"{wait_s:g}", "--modules", ",".join(modules),
            "--gpus", str(gpus)]
    if serve:
        argv.append("--serve")
    if not container:
        return " ".join(shlex.quote(a) for a in argv)
    from dsk_provision import containers

    argv = containers.run_argv(node, container, argv, name=f"dsk-preflight-{node.name}",
                               workdir="/", binds=[], env={}, stdin=True)
    return (f"{containers.image_command(node, container)} && "
            f"{containers.remove_command(node, f'dsk-preflight-{node.name}')} && "
            + " ".join(shlex.quote(a) for a in argv))


def _last_line(text: str) -> str:
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    return lines[-1] if lines else ""


def judge(node, rc: int, output: str, *, host: str, port: int, first: str, serve: bool,
          ranks: int, gpus: int, ssh: bool, timeout_s: float,
          container: str | None = None) -> NodeCheck:
    """Turn one probe's exit code and output into a NodeCheck."""
    check = NodeCheck(node.name)
    python = node.settings.python
    image = next((x for x in (output or "").splitlines() if x.startswith(IMAGE_MARKER)),
                 None)
    if image is not None and container:
        check.problems.append(f"image {container}: {image[len(IMAGE_MARKER):].strip()}")
        return check
    if container:
        python = f"{python} in image {container}"
    line = next((x for x in (output or "").splitlines() if x.startswith(MARKER)), None)
    if line is None:
        if rc == 124:
            check.problems.append(f"no answer within {timeout_s:g} s")
        elif rc == 255 and ssh:
            check.problems.append(f"ssh could not connect ({_last_line(output) or 'exit 255'})")
        else:
            check.problems.append(f"its Python {python} does not run the check "
                                  f"({_last_line(output) or f'exit {rc}'})")
        return check
    try:
        report = json.loads(line[len(MARKER):])
    except json.JSONDecodeError:
        check.problems.append(f"the check's answer is not JSON: {line[:200]}")
        return check
    check.report = report
    endpoint = host_port(host, port)
    if "resolve_error" in report:
        check.problems.append(f"the rendezvous address {host} does not resolve here "
                              f"({report['resolve_error']})")
    if "listen_error" in report:
        check.problems.append(f"cannot listen on the rendezvous port {port} "
                              f"({report['listen_error']})")
    if "connect_error" in report:
        check.problems.append(f"cannot reach the rendezvous at {endpoint} "
                              f"({report['connect_error']})")
    if serve and report.get("hosts_rendezvous") is False:
        check.problems.append(f"torchrun here would not host the rendezvous: {host} is not "
                              f"one of {first}'s own names or addresses (hostname "
                              f"{report.get('hostname')!r})")
    errors = report.get("import_errors") or {}
    missing = [m for m in report.get("missing") or [] if m in errors]
    if missing:
        check.problems.append(f"{python} cannot import {', '.join(missing)} (No module named "
                              + ", ".join(repr(m) for m in missing) + ")")
    for module, why in sorted(errors.items()):
        if module not in missing:
            check.problems.append(f"{python} cannot import {module} ({why})")
    seen = report.get("cuda_devices")
    if gpus and seen is not None and seen < ranks:
        check.problems.append(f"{ranks} ranks need {ranks} GPUs, but its Python sees {seen}")
    return check


def check_nodes(inventory, modules: list[str], *, ranks: dict[str, int],
                transport: TransportChoice = None, wait_s: float = CONNECT_S,
                timeout_s: float = PROBE_TIMEOUT_S,
                container: str | None = None) -> list[NodeCheck]:
    """Probe every node at once (``ranks``: processes per node; ``container``: in that
    image). Returns each node's findings; raises RunFailed naming every node with a
    problem."""
    nodes = inventory.nodes
    host = rendezvous_host(inventory)
    port = nodes[0].settings.rdzv_port
    results: dict[str, NodeCheck] = {}

    def one(index: int, node) -> None:
        serve = index == 0
        gpus = int(node.gpus or 0)
        way = resolve_transport(transport, inventory, node)
        command = probe_command(node, host=host, port=port, serve=serve, peers=len(nodes),
                                modules=modules, gpus=gpus, wait_s=wait_s,
                                container=container)
        try:
            with open(PROBE, "rb") as program:
                rc, out = run_command(way, node, command, stdin=program, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a node that cannot be asked is a finding
            results[node.name] = NodeCheck(node.name, [str(exc)])
            return
        results[node.name] = judge(node, rc, out, host=host, port=port, first=nodes[0].name,
                                   serve=serve, ranks=ranks.get(node.name, 1), gpus=gpus,
                                   ssh=isinstance(way, SshTransport), timeout_s=timeout_s,
                                   container=container)

    threads = [threading.Thread(target=one, args=(i, n), daemon=True)
               for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    checks = [results[n.name] for n in nodes]
    failed = [c for c in checks if c.problems]
    if failed:
        raise RunFailed(_failure_message(failed), nodes=[c.name for c in failed],
                        hint=_hint(inventory, failed, container))
    return checks


def gpu_memory_gib(inventory) -> float | None:
    """Each GPU's memory from the inventory's hardware profile; None for CPU nodes or
    a profile that does not say."""
    if not any(n.gpus for n in inventory.nodes) or not inventory.profile:
        return None
    from dsk_provision.validation.profiles import read_profile

    return read_profile(str(inventory.profile), file=str(inventory.path))["gpu_memory_gib"]


def check_memory(inventory, cfg, world_size: int, *, say=print):
    """Refuse (InputError, before any connection) a layout of ``cfg`` whose memory
    estimate per GPU exceeds the GPUs' memory; returns the estimate, None on CPU nodes."""
    capacity = gpu_memory_gib(inventory)
    if capacity is None:
        return None
    from trainer.memory import check_fits

    est = check_fits(cfg, world_size, capacity)
    say(f"train: about {est.total_gib:.1f} GiB per GPU of {capacity:g} GiB "
        f"(python -m trainer.memory --config {cfg.path} --gpus {world_size})")
    return est


def before_launch(inventory, cfg, ranks: dict[str, int], *,
                  transport: TransportChoice = None, container: str | None = None,
                  say=print) -> list[NodeCheck]:
    """The checks of a training run of ``cfg`` (a TrainConfig), said as they start;
    with ``container``, the image is on every node and the probe runs in it."""
    from trainer.imports import modules_for

    modules = modules_for(cfg)
    say(f"train: checking {len(inventory.nodes)} node(s): rendezvous at "
        f"{rendezvous_endpoint(inventory)}, Python modules {', '.join(modules)}"
        + (f", in image {container}" if container else ""))
    return check_nodes(inventory, modules, ranks=ranks, transport=transport,
                       container=container)


def _failure_message(failed: list[NodeCheck]) -> str:
    lines = [f"checks before the launch failed on {', '.join(c.name for c in failed)}:"]
    for check in failed:
        lines += [f"  {check.name}: {problem}" for problem in check.problems]
    return "\n".join(lines)


def _hint(inventory, failed: list[NodeCheck], container: str | None = None) -> str:
    first = inventory.nodes[0]
    words = " ".join(p for c in failed for p in c.problems)
    if container and f"image {container}:" in words:
        return (f"load {container} on those nodes (podman load / docker load) or make it "
                "pullable there; nothing was started on any node")
    if "rendezvous" in words:
        named = first.address == first.name
        return (f"torchrun's rendezvous runs on {first.name} at {first.address}: "
                + (f"set ansible_host of {first.name} to an address that every node "
                   "resolves and reaches" if named else
                   f"make {first.address} reachable from every node on port "
                   f"{first.settings.rdzv_port} (firewall), or set ansible_host of "
                   f"{first.name} to one that is"))
    if container and ("cannot import" in words or "does not run" in words):
        return (f"the image {container} needs the trainer's Python environment at "
                f"{first.settings.python} (docs/trainer.md, \"Jobs in a container\")")
    if "cannot import" in words or "does not run" in words:
        return ("install the trainer environment on those nodes: dsk-provision bootstrap "
                "-i INVENTORY --tags trainer_env")
    return "nothing was started on any node"


__all__ = ["NodeCheck", "before_launch", "check_memory", "check_nodes", "gpu_memory_gib",
           "probe_command", "rendezvous_endpoint", "rendezvous_host"]
