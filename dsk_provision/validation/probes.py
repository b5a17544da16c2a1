"""The measurements validate runs on the nodes: the all-reduce and compute probes (torchrun
through dsk_provision.launch) and nccl-tests' all_reduce_perf (a plain command through
dsk_provision.remote). Each returns the probe's results, or the error that stands in
for them; judging them is the checks' business.

Every launch after the first gets its own run directory under
``<run>/steps/<run id>.<step>/`` (its logs and results), so runs on the nodes never share
a run id.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsk_provision.defaults import resolve
from dsk_provision.errors import RunFailed
from dsk_provision.files import write_private
from dsk_provision.launch import fetch_first, remote_run_dir, run_torchrun
from dsk_provision.remote import fetch, resolve_transport, run_command
from dsk_provision.validation.parsers import parse_nccl_tests

# The node-side probes, as torchrun runs them (python -m MODULE).
ALLREDUCE_PROBE = "trainer.probes.allreduce"
GPU_PERF_PROBE = "trainer.probes.gpu_perf"
# What the all-reduce probe writes (--json-out) in its run directory.
ALLREDUCE_JSON = "allreduce.json"
# The compute probe's result, in each node's own run directory: by name, not by the
# node's rank in the rendezvous (c10d orders nodes by address, then PID, not as the
# inventory does).
GPU_PERF_JSON = "gpu_perf.json"
# all_reduce_perf's exit code when it is not installed (the command below says so).
_NOT_INSTALLED = 3


def subset(inventory, names: list[str]):
    """The inventory restricted to these nodes, in this order (the first hosts rendezvous)."""
    by_name = {n.name: n for n in inventory.nodes}
    return dataclasses.replace(inventory, nodes=[by_name[n] for n in names])


def step_dir(run_dir: Path, step: str) -> Path:
    """The run directory of one step of a validation run."""
    return run_dir / "steps" / f"{run_dir.name}.{step}"


def allreduce_args(begin: str, end: str, factor: int, warmup: int, iters: int) -> list[str]:
    """The all-reduce probe's arguments: sizes, repetitions, where its results go."""
    return ["--begin", begin, "--end", end, "--factor", str(int(factor)),
            "--warmup", str(int(warmup)), "--iters", str(int(iters)),
            "--json-out", ALLREDUCE_JSON]


def run_allreduce(inventory, run_dir: Path, args: list[str], console, timeout_s, transport,
                  nproc_per_node: int | None = None) -> dict:
    """The all-reduce probe over the inventory's nodes: its results. Raises RunFailed."""
    try:
        run_torchrun(inventory, ALLREDUCE_PROBE, args, run_dir=run_dir, console=console,
                     timeout_s=timeout_s, transport=transport, nproc_per_node=nproc_per_node)
    except RunFailed as launch_error:
        # The probe exits 1 after writing its results when sums were wrong: those
        # results are the evidence, so they are fetched and judged like any other.
        try:
            _, local = fetch_first(inventory, ALLREDUCE_JSON, run_dir.name,
                                   run_dir / ALLREDUCE_JSON, transport=transport)
            bench = json.loads(local.read_text())
        except (RunFailed, json.JSONDecodeError):
            raise launch_error from None
        if not bench.get("wrong_total"):
            raise
        return bench
    _, local = fetch_first(inventory, ALLREDUCE_JSON, run_dir.name, run_dir / ALLREDUCE_JSON,
                           transport=transport)
    return json.loads(local.read_text())


def allreduce_or_error(inventory, run_dir, args, console, timeout_s, transport,
                       nproc=None) -> tuple[dict | None, str | None]:
    """(results, None), or (None, the first line of the error)."""
    try:
        return run_allreduce(inventory, run_dir, args, console, timeout_s, transport,
                             nproc_per_node=nproc), None
    except (RunFailed, json.JSONDecodeError) as exc:
        return None, str(exc).splitlines()[0]


def run_gpu_perf(inventory, run_dir: Path, console, timeout_s, transport,
                 args: list[str] | None = None) -> tuple[dict[str, dict | None], str | None]:
    """The compute probe on every node (one process each): {node: result or None}."""
    step = step_dir(run_dir, "perf")
    out: dict[str, dict | None] = {n.name: None for n in inventory.nodes}
    try:
        run_torchrun(inventory, GPU_PERF_PROBE, [*(args or []), "--json-out", GPU_PERF_JSON],
                     run_dir=step, console=console, timeout_s=timeout_s, transport=transport,
                     nproc_per_node=1)
    except RunFailed as exc:
        return out, str(exc).splitlines()[0]
    errors = []
    for node in inventory.nodes:
        remote = remote_run_dir(node, step.name) / GPU_PERF_JSON
        try:
            local = fetch(inventory, node, remote, run_dir / "perf" / f"{node.name}.json",
                          transport=transport)
            out[node.name] = json.loads(local.read_text())
        except (RunFailed, json.JSONDecodeError) as exc:
            errors.append(str(exc).splitlines()[0])
    return out, "; ".join(errors) or None


def nccl_tests_path(node) -> str:
    """Where the nccl_tests role installs all_reduce_perf on this node."""
    base = resolve("nccl_tests_install_dir", node.vars, role="nccl_tests")
    version = resolve("nccl_tests_version", node.vars, role="nccl_tests")
    return f"{base}/{version}/build/all_reduce_perf"


def nccl_tests_command(node, begin: str, end: str, factor: int, warmup: int, iters: int,
                       path: str | None = None) -> str:
    """all_reduce_perf (the role's, or ``path``) on one node with every GPU (-g), the sizes
    of our benchmark."""
    path = shlex.quote(path or nccl_tests_path(node))
    return (f"test -x {path} || {{ echo 'not installed'; exit {_NOT_INSTALLED}; }}; "
            f"exec {path} -b {begin} -e {end} -f {int(factor)} -g {int(node.gpus)} "
            f"-w {int(warmup)} -n {int(iters)}")


def run_nccl_tests(inventory, run_dir: Path, begin, end, factor, warmup, iters, transport,
                   timeout_s: float = 1800) -> dict[str, tuple[str, dict | str]]:
    """{node: ("ok", parsed) | ("skip", reason) | ("fail", reason)} for nodes with GPUs."""

    def one(node):
        if not node.gpus:
            return node.name, ("skip", "no GPU on this node")
        command = nccl_tests_command(node, begin, end, factor, warmup, iters)
        rc, out = run_command(resolve_transport(transport, inventory, node), node, command,
                              timeout=timeout_s)
        write_private(run_dir / "nccl-tests" / f"{node.name}.txt", out or "")
        if rc == _NOT_INSTALLED and "not installed" in (out or ""):
            return node.name, ("skip", f"nccl-tests not installed ({nccl_tests_path(node)})")
        parsed = parse_nccl_tests(out or "")
        if rc != 0 or not parsed["results"]:
            tail = (out or "").strip().splitlines()
            return node.name, ("fail", f"all_reduce_perf exited {rc}: "
                                       f"{tail[-1] if tail else 'no output'}")
        return node.name, ("ok", parsed)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(inventory.nodes)))) as pool:
        return dict(pool.map(one, inventory.nodes))
