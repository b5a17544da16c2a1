"""`dsk-provision status`: one row per node, fast enough to run any time.

Each node gets one probe, all in parallel, each bounded by a timeout: one ssh (or local)
command that runs a small Python program on the node. The program is the health_check
role's own fact gathering (roles/health_check/library/dsk_node_facts.py and the PCI scan
it shares, module_utils/dsk_pci.py), run without Ansible: the GPUs, the loaded driver,
CUDA and NCCL versions read exactly as `validate` reads them. A node that does not answer
within the timeout is shown unreachable; it never holds up the others.

With ``drift`` the cluster also gets bootstrap's check mode (site.yml --check:
every role's verify-then-converge probe), and each row lists the tasks a bootstrap would
change there. The last validation result comes from the run directories of `validate`
(``<runs>/<time>-validate/report.json``): the newest report of this cluster that covers
the node.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsk_provision import defaults, rundir

REPO = Path(__file__).resolve().parent.parent
NODE_FACTS_MODULE = REPO / "roles" / "health_check" / "library" / "dsk_node_facts.py"
PCI_MODULE_UTIL = REPO / "module_utils" / "dsk_pci.py"
# Seconds one node may take to answer the probe (connection included).
PROBE_TIMEOUT_S = 15.0
# How many nodes are probed at once.
PROBE_WORKERS = 64

# Runs on the node: the health_check module's functions, with the two Ansible imports it
# makes stood in for (the PCI scan is the real one; AnsibleModule is not used).
_PROGRAM = """\
import json, socket, sys, types
sources = json.loads({sources!r})
for name in ("ansible", "ansible.module_utils"):
    sys.modules[name] = types.ModuleType(name)
basic = types.ModuleType("ansible.module_utils.basic")
basic.AnsibleModule = None
sys.modules["ansible.module_utils.basic"] = basic
pci = types.ModuleType("ansible.module_utils.dsk_pci")
exec(compile(sources["dsk_pci"], "dsk_pci.py", "exec"), pci.__dict__)
sys.modules["ansible.module_utils.dsk_pci"] = pci
facts = types.ModuleType("dsk_node_facts")
exec(compile(sources["dsk_node_facts"], "dsk_node_facts.py", "exec"), facts.__dict__)
skipped = {{}}
print(json.dumps({{
    "hostname": socket.gethostname(),
    "gpus": len(facts.pci_gpus(pci.SYSFS_PCI)),
    "driver": facts.nvidia_driver(),
    "cuda": facts.cuda_version({cuda_home!r}, skipped),
    "nccl": facts.nccl_package_version(skipped),
}}))
"""


def probe_program(cuda_home: str) -> str:
    sources = {"dsk_pci": PCI_MODULE_UTIL.read_text(encoding="utf-8"),
               "dsk_node_facts": NODE_FACTS_MODULE.read_text(encoding="utf-8")}
    return _PROGRAM.format(sources=json.dumps(sources), cuda_home=cuda_home)


@dataclass
class NodeStatus:
    name: str
    address: str
    reachable: bool
    error: str | None = None            # why it is unreachable (or the probe failed)
    cordoned: str | None = None         # the reason, when cordoned
    gpus_declared: int | None = None
    gpus: int | None = None             # detected on the PCI bus
    driver: str | None = None
    cuda: str | None = None
    nccl: str | None = None
    probe_s: float | None = None
    drift: list[str] | None = None      # tasks a bootstrap would change; None: not checked
    drift_error: str | None = None
    validation: dict[str, Any] | None = None  # {"result", "failed", "time", "report"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClusterStatus:
    cluster: str
    nodes: list[NodeStatus] = field(default_factory=list)
    drift_checked: bool = False
    drift_run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "drift_checked": self.drift_checked,
                "drift_run_dir": self.drift_run_dir,
                "reachable": sum(n.reachable for n in self.nodes),
                "nodes": [n.to_dict() for n in self.nodes]}


def _probe_argv(inventory, node) -> list[str]:
    from dsk_provision.remote import SshTransport, transport_for

    python = str((node.vars or {}).get("ansible_python_interpreter") or "python3")
    transport = transport_for(inventory, node)
    argv = transport.argv(node, f"{python} -")
    if isinstance(transport, SshTransport):
        # Options given first win in ssh: a master connection already open is used, but
        # none is started (a master for a dead node would outlive the probe's timeout).
        argv[1:1] = ["-o", "ControlMaster=no"]
    return argv


def parse_probe(node, rc: int, out: str, err: str) -> NodeStatus:
    """A node's row from its probe's exit code and output."""
    row = NodeStatus(name=node.name, address=str(node.address), reachable=False,
                     cordoned=node.cordoned, gpus_declared=node.gpus)
    if rc == 124:
        row.error = err or "no answer"
        return row
    if rc == 255:  # ssh's own failure: no connection, refused key, changed host key
        lines = [ln for ln in err.splitlines() if ln.strip()]
        row.error = lines[-1].strip() if lines else "ssh failed"
        return row
    row.reachable = True
    last = [ln for ln in out.splitlines() if ln.startswith("{")]
    try:
        facts = json.loads(last[-1]) if last else None
    except ValueError:
        facts = None
    if rc != 0 or not isinstance(facts, dict):
        lines = [ln for ln in (err or out).splitlines() if ln.strip()]
        row.error = f"probe failed (exit {rc}): {lines[-1].strip() if lines else 'no output'}"
        return row
    row.gpus, row.driver = facts.get("gpus"), facts.get("driver")
    row.cuda, row.nccl = facts.get("cuda"), facts.get("nccl")
    return row


def probe_nodes(inventory, nodes=None, *, timeout: float = PROBE_TIMEOUT_S,
                run=None) -> list[NodeStatus]:
    """One probe per node, in parallel, each given ``timeout`` seconds; rows in inventory
    order. ``run(argv, stdin_text, timeout) -> (rc, stdout, stderr)`` (rc 124: timeout)."""
    run = run or _run
    nodes = list(inventory.nodes if nodes is None else nodes)

    def one(node) -> NodeStatus:
        cuda_home = str(defaults.resolve("cuda_home", node.vars or {}))
        started = time.monotonic()
        rc, out, err = run(_probe_argv(inventory, node), probe_program(cuda_home), timeout)
        row = parse_probe(node, rc, out, err)
        row.probe_s = round(time.monotonic() - started, 2)
        return row

    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(PROBE_WORKERS, len(nodes))) as pool:
        return list(pool.map(one, nodes))


def _run(argv: list[str], stdin_text: str, timeout: float) -> tuple[int, str, str]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, err = proc.communicate(stdin_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return 124, "", f"no answer within {timeout:g} s"
    except BaseException:
        _stop(proc)
        raise
    return proc.returncode, out, err


def _stop(proc: subprocess.Popen) -> None:
    """Kill the probe's process group (its own session) and stop reading its output: a
    process that kept the pipes open must not hold the row past its timeout."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    proc.wait()


# ------------------------------------------------------------------ drift (check mode)

_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+)\s+(.*)$")


def changed_tasks(host_log: str) -> list[str]:
    """The tasks a check-mode run reported as changed, from the runner's host log."""
    out = []
    for line in host_log.splitlines():
        match = _LOG_LINE.match(line)
        if match and match.group(1) == "changed":
            task = match.group(2).split(": ", 1)[0] if ": " in match.group(2) \
                else match.group(2)
            if task not in out:
                out.append(task)
    return out


def check_drift(inventory, rows: list[NodeStatus], *, runs_dir: Path | None,
                console) -> str | None:
    """Bootstrap's check mode on every node; fills the drift of the reachable nodes'
    rows. Returns the run directory."""
    from dsk_provision.errors import DskError
    from dsk_provision.runner import run_playbook

    reachable = [r for r in rows if r.reachable]
    if not reachable:
        return None
    where = rundir.new_run_dir("status", runs_dir)
    error = None
    try:
        # Every node, not --limit to those that answered: a node outside --limit is one
        # ssh_trust gathers host keys from, and a dead one there would end the play early.
        # A dead node in the run is dropped after its first task, its rows already say so.
        run_playbook("site.yml", inventory, command="status-drift", runs_dir=where,
                     check=True, console=console)
    except DskError as exc:
        error = str(exc)
    runs = sorted(where.glob("*-status-drift*"))
    logs = runs[-1] / "hosts" if runs else None
    for row in reachable:
        log = logs / f"{row.name}.log" if logs else None
        text = log.read_text(encoding="utf-8", errors="replace") if log and log.is_file() \
            else ""
        if error and (f"{row.name}:" in error or not text):
            row.drift_error = _first_line_about(error, row.name)
        row.drift = changed_tasks(text) if text else None
    return str(runs[-1]) if runs else str(where)


def _first_line_about(error: str, node: str) -> str:
    for line in error.splitlines():
        if line.strip().startswith(f"{node}:"):
            return line.strip()[len(node) + 1:].strip()
    return error.splitlines()[0]


# ------------------------------------------------------------------ last validation

def last_validations(cluster: str, names: list[str],
                     runs_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """{node: {"result": "pass"|"fail", "failed": [checks], "time", "report"}} from the
    newest validate report of ``cluster`` that covers each node."""
    root = rundir.runs_root(runs_dir)
    out: dict[str, dict[str, Any]] = {}
    for report_file in sorted(root.glob("*-validate*/report.json"), reverse=True):
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or report.get("cluster") != cluster:
            continue
        checks = report.get("checks") or []
        covered = set(report.get("nodes") or []) | {c.get("node") for c in checks}
        for name in names:
            if name in out or name not in covered:
                continue
            failed = [c.get("check") for c in checks
                      if c.get("node") == name and c.get("status") == "fail"]
            out[name] = {"result": "fail" if failed else "pass", "failed": failed,
                         "time": report.get("started"), "report": str(report_file)}
        if len(out) == len(names):
            break
    return out


def cluster_status(inventory, *, runs_dir: Path | None = None, drift: bool = False,
                   timeout: float = PROBE_TIMEOUT_S, console=None) -> ClusterStatus:
    """The status of every node of ``inventory``."""
    result = ClusterStatus(cluster=inventory.cluster_name,
                           nodes=probe_nodes(inventory, timeout=timeout))
    validations = last_validations(inventory.cluster_name, [n.name for n in inventory.nodes],
                                   runs_dir)
    for row in result.nodes:
        row.validation = validations.get(row.name)
    if drift:
        result.drift_checked = True
        result.drift_run_dir = check_drift(inventory, result.nodes, runs_dir=runs_dir,
                                           console=console)
    return result


def table_rows(status: ClusterStatus) -> list[list[str]]:
    """The status table as text cells: node, reachable, cordoned, GPUs, driver, CUDA,
    NCCL, drift, last validation."""
    rows = []
    for n in status.nodes:
        reach = "yes" if n.reachable and not n.error else (
            f"yes, {n.error}" if n.reachable else f"no: {n.error}")
        gpus = "-" if n.gpus is None else str(n.gpus)
        if n.gpus is not None and n.gpus_declared is not None and n.gpus != n.gpus_declared:
            gpus += f" of {n.gpus_declared} declared"
        if not status.drift_checked:
            drift = "not checked"
        elif not n.reachable:
            drift = "-"
        elif n.drift_error:
            drift = f"check failed: {n.drift_error}"
        elif n.drift is None:
            drift = "-"
        elif not n.drift:
            drift = "none"
        else:
            drift = f"{len(n.drift)} task(s): " + ", ".join(n.drift)
        if n.validation is None:
            validation = "never"
        else:
            validation = n.validation["result"]
            if n.validation["failed"]:
                validation += " (" + ", ".join(n.validation["failed"]) + ")"
            validation += f" at {n.validation['time']}"
        rows.append([n.name, reach, n.cordoned or "no", gpus, n.driver or "-",
                     n.cuda or "-", n.nccl or "-", drift, validation])
    return rows


TABLE_HEADER = ["node", "reachable", "cordoned", "GPUs", "driver", "CUDA", "NCCL", "drift",
                "last validation"]
