"""`dsk-provision validate`: per-node health checks + benchmarks -> report.

1. thresholds from the hardware profile, the inventory's ``dsk_thresholds`` and the caller
   (bad names or values are InputErrors before anything runs);
2. the ``validate.yml`` playbook writes one facts JSON per node into ``<run>/facts/``;
   the node checks (GPU, versions against the inventory's pins, fabric, disk, memory,
   clock) judge them;
3. ``trainer.bench.gpu_perf`` measures matmul and memory copy on every node;
4. ``trainer.bench.allreduce`` runs within each node (one process per GPU; skipped on a
   node of one process), then across every node; nccl-tests' ``all_reduce_perf`` runs
   within each node where it is installed, with the same sizes, for comparison;
5. a cross-node busbw below its threshold on two or more nodes starts isolation
   (``dsk_provision.isolate``): pairs of nodes, and the slow node or link is named;
6. ``report.json``, ``report.md`` and ``allreduce_busbw.png`` land in the run directory;
   a table is printed; RunFailed names the failing node(s) and check(s).

Every benchmark launch after the first gets its own run directory under
``<run>/steps/<run id>.<step>/`` (its logs and results), so runs on the nodes never share
a run id.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsk_provision import checks as checks_mod
from dsk_provision import report as report_mod
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.sizes import read_size

BENCH_MODULE = "trainer.bench.allreduce"
BENCH_JSON = "allreduce.json"
PERF_MODULE = "trainer.bench.gpu_perf"
PLOT_FILE = "allreduce_busbw.png"
# Where the nccl_tests role installs all_reduce_perf (roles/nccl_tests/defaults/main.yml).
NCCL_TESTS_DIR = "/opt/nccl-tests"
NCCL_TESTS_VERSION = "2.17.6"
# Above this many nodes the printed table shows only what did not pass.
FULL_TABLE_MAX_NODES = 8


@dataclass
class ValidationReport:
    run_dir: Path
    cluster: str
    profile: str
    nodes: list[str]
    thresholds: dict[str, Any]
    checks: list[checks_mod.CheckResult] = field(default_factory=list)
    allreduce: dict | None = None
    intra_node: dict[str, dict] = field(default_factory=dict)
    nccl_tests: dict[str, dict] = field(default_factory=dict)
    gpu_perf: dict[str, dict] = field(default_factory=dict)
    isolation: dict | None = None
    plots: list[str] = field(default_factory=list)
    started: str = ""
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def failures(self) -> list[checks_mod.CheckResult]:
        return [c for c in self.checks if c.failed]

    def summary(self) -> dict[str, int]:
        counts = {"pass": 0, "fail": 0, "skip": 0}
        for c in self.checks:
            counts[c.status] = counts.get(c.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "validate",
            "cluster": self.cluster,
            "profile": self.profile,
            "passed": self.passed,
            "run_dir": str(self.run_dir),
            "started": self.started,
            "elapsed_s": round(self.elapsed_s, 2),
            "nodes": list(self.nodes),
            "thresholds": self.thresholds,
            "summary": self.summary(),
            "checks": [c.to_dict() for c in self.checks],
            "allreduce": self.allreduce,
            "intra_node": self.intra_node,
            "nccl_tests": self.nccl_tests,
            "gpu_perf": self.gpu_perf,
            "isolation": self.isolation,
            "plots": list(self.plots),
        }


def read_facts(run_dir: Path, nodes: list[str]) -> dict[str, dict | None]:
    """facts/<host>.json per node; None where a node wrote none (or wrote nonsense)."""
    out: dict[str, dict | None] = {}
    for name in nodes:
        path = Path(run_dir) / "facts" / f"{name}.json"
        try:
            out[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            out[name] = None
    return out


def _subset(inventory, names: list[str]):
    """The inventory restricted to these nodes, in this order (the first hosts rendezvous)."""
    by_name = {n.name: n for n in inventory.nodes}
    return dataclasses.replace(inventory, nodes=[by_name[n] for n in names])


def _step_dir(run_dir: Path, step: str) -> Path:
    return run_dir / "steps" / f"{run_dir.name}.{step}"


def _run_benchmark(inventory, run_dir: Path, args: list[str], console, timeout_s, transport,
                   nproc_per_node: int | None = None):
    from dsk_provision.launch import fetch_first, run_torchrun

    try:
        run_torchrun(inventory, BENCH_MODULE, args, run_dir=run_dir, console=console,
                     timeout_s=timeout_s, transport=transport, nproc_per_node=nproc_per_node)
    except RunFailed as launch_error:
        # The benchmark exits 1 after writing its results when sums were wrong: those
        # results are the evidence, so they are fetched and judged like any other.
        try:
            _, local = fetch_first(inventory, BENCH_JSON, run_dir.name, run_dir / BENCH_JSON,
                                   transport=transport)
            bench = json.loads(local.read_text())
        except (RunFailed, json.JSONDecodeError):
            raise launch_error from None
        if not bench.get("wrong_total"):
            raise
        return bench
    _, local = fetch_first(inventory, BENCH_JSON, run_dir.name, run_dir / BENCH_JSON,
                           transport=transport)
    return json.loads(local.read_text())


def _bench_or_error(inventory, run_dir, args, console, timeout_s, transport, nproc=None):
    try:
        return _run_benchmark(inventory, run_dir, args, console, timeout_s, transport,
                              nproc_per_node=nproc), None
    except (RunFailed, json.JSONDecodeError) as exc:
        return None, str(exc).splitlines()[0]


def run_gpu_perf(inventory, run_dir: Path, console, timeout_s, transport,
                 args: list[str] | None = None) -> tuple[dict[str, dict | None], str | None]:
    """trainer.bench.gpu_perf on every node (one process each): {node: result or None}."""
    from dsk_provision.launch import fetch, remote_run_dir, run_torchrun

    step = _step_dir(run_dir, "perf")
    out: dict[str, dict | None] = {n.name: None for n in inventory.nodes}
    try:
        run_torchrun(inventory, PERF_MODULE, [*(args or []), "--json-out",
                                              "gpu_perf-{node}.json"],
                     run_dir=step, console=console, timeout_s=timeout_s, transport=transport,
                     nproc_per_node=1)
    except RunFailed as exc:
        return out, str(exc).splitlines()[0]
    errors = []
    for index, node in enumerate(inventory.nodes):
        remote = remote_run_dir(node, step.name) / f"gpu_perf-{index}.json"
        try:
            local = fetch(inventory, node, remote, run_dir / "perf" / f"{node.name}.json",
                          transport=transport)
            out[node.name] = json.loads(local.read_text())
        except (RunFailed, json.JSONDecodeError) as exc:
            errors.append(str(exc).splitlines()[0])
    return out, "; ".join(errors) or None


def nccl_tests_path(node) -> str:
    base = node.vars.get("nccl_tests_install_dir") or NCCL_TESTS_DIR
    version = node.vars.get("nccl_tests_version") or NCCL_TESTS_VERSION
    return f"{base}/{version}/build/all_reduce_perf"


def nccl_tests_command(node, begin: str, end: str, factor: int, warmup: int, iters: int) -> str:
    """all_reduce_perf on one node with every GPU (-g), the sizes of our benchmark."""
    path = shlex.quote(nccl_tests_path(node))
    return (f"test -x {path} || {{ echo 'not installed'; exit 3; }}; "
            f"exec {path} -b {begin} -e {end} -f {int(factor)} -g {int(node.gpus)} "
            f"-w {int(warmup)} -n {int(iters)}")


def run_nccl_tests(inventory, run_dir: Path, begin, end, factor, warmup, iters, transport,
                   timeout_s: float = 1800) -> dict[str, tuple[str, dict | str]]:
    """{node: ("ok", parsed) | ("skip", reason) | ("fail", reason)} for nodes with GPUs."""
    from dsk_provision.launch import _resolve_transport, _run

    def one(node):
        if not node.gpus:
            return node.name, ("skip", "no GPU on this node")
        command = nccl_tests_command(node, begin, end, factor, warmup, iters)
        rc, out = _run(_resolve_transport(transport, inventory, node), node, command,
                       timeout=timeout_s)
        (run_dir / "nccl-tests").mkdir(parents=True, exist_ok=True)
        (run_dir / "nccl-tests" / f"{node.name}.txt").write_text(out or "")
        if rc == 3 and "not installed" in (out or ""):
            return node.name, ("skip", f"nccl-tests not installed ({nccl_tests_path(node)})")
        parsed = checks_mod.parse_nccl_tests(out or "")
        if rc != 0 or not parsed["results"]:
            tail = (out or "").strip().splitlines()
            return node.name, ("fail", f"all_reduce_perf exited {rc}: "
                                       f"{tail[-1] if tail else 'no output'}")
        return node.name, ("ok", parsed)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(inventory.nodes)))) as pool:
        return dict(pool.map(one, inventory.nodes))


def _nccl_tests_checks(report, outcomes: dict, merged: dict) -> None:
    for name, (kind, value) in outcomes.items():
        if kind == "ok":
            report.nccl_tests[name] = value
            result = checks_mod.check_allreduce_correct(value, merged, node=name,
                                                        check="nccl_tests")
            row = checks_mod._largest(value)
            if result.status == checks_mod.PASS and row:
                busbw = max(row["out_of_place"]["busbw_gbs"], row["in_place"]["busbw_gbs"])
                result.value = round(busbw, 3)
                result.threshold = None
                result.message = (f"all_reduce_perf busbw {busbw:.3f} GB/s at {row['size']} B "
                                  f"({value.get('world_size')} GPUs), shown beside ours")
            report.checks.append(result)
        else:
            status = checks_mod.SKIP if kind == "skip" else checks_mod.FAIL
            report.checks.append(checks_mod.CheckResult(name, "nccl_tests", status, None, None,
                                                        value))


def _intra_node(inventory, run_dir, args, console, timeout_s, transport, merged, report):
    """The all-reduce within each node: nproc = its GPUs; one-process nodes are skipped."""
    from dsk_provision.launch import nproc_for

    todo = []
    for node in inventory.nodes:
        procs = nproc_for(node)
        if procs < 2:
            why = ("one process on this node (no GPUs): nothing moves within it"
                   if not node.gpus else "one GPU on this node: nothing moves within it")
            report.checks.append(checks_mod.CheckResult(node.name, "allreduce_intra",
                                                        checks_mod.SKIP, None, None, why))
        else:
            todo.append(node)

    def one(node):
        sub = _subset(inventory, [node.name])
        return node.name, _bench_or_error(sub, _step_dir(run_dir, f"intra-{node.name}"), args,
                                          console, timeout_s, transport)

    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
        for name, (bench, error) in pool.map(one, todo):
            if bench is None:
                report.checks.append(checks_mod.CheckResult(
                    name, "allreduce_intra", checks_mod.FAIL, None, None, error))
                continue
            report.intra_node[name] = bench
            report.checks.append(checks_mod.check_allreduce_correct(
                bench, merged, node=name, check="allreduce_intra_correct"))
            report.checks.append(checks_mod.check_allreduce_busbw(
                bench, merged, 1, node=name, check="allreduce_intra"))


def _isolate(inventory, run_dir, args, console, timeout_s, transport, merged, report) -> None:
    from dsk_provision import isolate as isolate_mod

    minimum = checks_mod.busbw_threshold(merged, 2)
    names = [n.name for n in inventory.nodes]

    def measure(pair):
        sub = _subset(inventory, list(pair))
        bench, _ = _bench_or_error(sub, _step_dir(run_dir, f"pair-{pair[0]}-{pair[1]}"), args,
                                   console, timeout_s, transport)
        row = checks_mod._largest(bench) if bench else None
        if row is None:
            return None
        return max(row["out_of_place"]["busbw_gbs"], row["in_place"]["busbw_gbs"])

    console.print(f"isolating: all-reduce on pairs of nodes ({minimum:g} GB/s expected)",
                  markup=False, highlight=False)
    verdict = isolate_mod.isolate(names, measure, minimum)
    report.isolation = verdict.to_dict()

    def show(v):
        return "run failed" if v is None else f"{v:.4f} GB/s"

    for name in verdict.slow_nodes:
        mine = {p: v for p, v in verdict.pairs.items() if name in p}
        detail = ", ".join(f"with {p[1] if p[0] == name else p[0]}: {show(v)}"
                           for p, v in mine.items())
        worst = max((v for v in mine.values() if v is not None), default=None)
        report.checks.append(checks_mod.CheckResult(
            name, "allreduce_isolation", checks_mod.FAIL,
            None if worst is None else round(worst, 4), minimum,
            f"slow in every pair it is in ({detail}): this node or its link is the culprit"))
    for a, b in verdict.slow_links:
        value = verdict.pairs[(a, b)]
        for name in (a, b):
            report.checks.append(checks_mod.CheckResult(
                name, "allreduce_isolation", checks_mod.FAIL,
                None if value is None else round(value, 4), minimum,
                f"the link between {a} and {b} is slow ({show(value)}); "
                f"{name} is fine with other nodes" if len(names) > 2 else
                f"the pair {a}+{b} is slow ({show(value)}); two nodes cannot tell which "
                f"is to blame"))
    if verdict.all_slow:
        report.checks.append(checks_mod.CheckResult(
            checks_mod.CLUSTER, "allreduce_isolation", checks_mod.SKIP, None, minimum,
            "every pair of nodes is slow too: the network as a whole (or the threshold) is "
            "at fault, not one node"))
    elif not verdict.slow_nodes and not verdict.slow_links:
        report.checks.append(checks_mod.CheckResult(
            checks_mod.CLUSTER, "allreduce_isolation", checks_mod.SKIP, None, minimum,
            "every pair of nodes is fast enough: the slowness needs more nodes at once"))


def _plot(report: ValidationReport, console) -> None:
    from dsk_provision import plots

    try:
        import matplotlib  # noqa: F401 - only to say why no plot is drawn
    except ImportError:
        console.print("no plot: matplotlib is not installed", markup=False, highlight=False)
        return

    series = {}
    if report.allreduce:
        series[f"across nodes ({report.allreduce.get('world_size')} ranks)"] = \
            plots.busbw_series(report.allreduce)
    for name, bench in report.intra_node.items():
        series[f"within {name} ({bench.get('world_size')} ranks)"] = plots.busbw_series(bench)
    for name, bench in report.nccl_tests.items():
        series[f"nccl-tests within {name}"] = plots.busbw_series(bench)
    path = plots.plot_busbw(series, report.run_dir / PLOT_FILE,
                            title=f"all-reduce busbw: {report.cluster}")
    if path is not None:
        report.plots.append(path.name)


def validate(inventory, *, runs_dir: Path | None = None, begin: str = "1K",
             end: str | None = None, factor: int = 2, console=None,
             thresholds: dict | None = None, warmup: int = 5, iters: int = 20,
             timeout_s: float | None = 1800, transport=None, perf: bool = True,
             perf_args: list[str] | None = None, intra_node: bool = True,
             nccl_tests: bool = True, isolate: bool = True) -> ValidationReport:
    """Validate the cluster; returns the report, raises RunFailed when a check fails.

    ``end`` defaults to the profile's benchmark size (16M on the sandbox, 8G on GPU
    profiles, where busbw needs large messages to approach link speed). ``perf``,
    ``intra_node``, ``nccl_tests`` and ``isolate`` turn those steps off (tests use it);
    ``perf_args`` go to trainer.bench.gpu_perf (e.g. ["--size", "1024"]).
    """
    from dsk_provision import rundir
    from dsk_provision.runner import run_playbook

    profile_name, merged = checks_mod.resolve_thresholds(inventory, thresholds)
    profile = checks_mod.read_profile(profile_name)
    end = read_size(end or profile["benchmark"].get("end", "16M"), "end").text
    begin = read_size(begin, "begin").text
    if int(factor) < 2:
        raise InputError(f"factor must be at least 2, got {factor}", field="factor")
    if int(warmup) < 0 or int(iters) < 1:
        raise InputError("need warmup >= 0 and iters >= 1", field="iters")
    if console is None:
        from rich.console import Console

        console = Console()

    names = [n.name for n in inventory.nodes]
    run_dir = rundir.new_run_dir("validate", runs_dir)
    report = ValidationReport(run_dir=run_dir, cluster=str(inventory.vars.get(
        "dsk_cluster_name", "cluster")), profile=profile_name, nodes=names, thresholds=merged,
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    started = time.monotonic()

    # The playbook writes the facts into this run directory; ansible-runner's own
    # artifacts go into a run directory nested under it.
    playbook_error: RunFailed | None = None
    try:
        run_playbook("validate.yml", inventory, command="validate", runs_dir=run_dir / "playbook",
                     extra_vars={"dsk_run_dir": str(run_dir.resolve())}, console=console)
    except RunFailed as exc:
        playbook_error = exc

    facts = read_facts(run_dir, names)
    for node in inventory.nodes:
        results = checks_mod.run_node_checks(node.name, facts[node.name], merged,
                                             checks_mod.node_pins(node.vars))
        if facts[node.name] is None and playbook_error is not None:
            results[0].message += f": {str(playbook_error).splitlines()[0]}"
        report.checks += results

    missing = [n for n in names if facts[n] is None]
    args = ["--begin", begin, "--end", end, "--factor", str(int(factor)),
            "--warmup", str(int(warmup)), "--iters", str(int(iters)),
            "--json-out", BENCH_JSON]
    if missing:
        report.checks += checks_mod.run_benchmark_checks(
            None, merged, len(names),
            error=f"not run: no facts from {', '.join(missing)}")
    else:
        if perf:
            results, error = run_gpu_perf(inventory, run_dir, console, timeout_s, transport,
                                          perf_args)
            for name, result in results.items():
                if result is not None:
                    report.gpu_perf[name] = result
                report.checks += checks_mod.run_perf_checks(name, result, merged, error)
        if intra_node and len(names) > 1:
            _intra_node(inventory, run_dir, args, console, timeout_s, transport, merged, report)
        if nccl_tests:
            _nccl_tests_checks(report, run_nccl_tests(
                inventory, run_dir, begin, end, factor, warmup, iters, transport,
                timeout_s or 1800), merged)
        report.allreduce, error = _bench_or_error(inventory, run_dir, args, console,
                                                  timeout_s, transport)
        report.checks += checks_mod.run_benchmark_checks(report.allreduce, merged, len(names),
                                                         error=error)
        busbw = next((c for c in report.checks if c.node == checks_mod.CLUSTER
                      and c.check == "allreduce_busbw"), None)
        if isolate and busbw is not None and busbw.failed and len(names) >= 2:
            _isolate(inventory, run_dir, args, console, timeout_s, transport, merged, report)

    _plot(report, console)
    report.elapsed_s = time.monotonic() - started
    json_path, md_path = report_mod.write_reports(report.to_dict(), run_dir)
    print_table(report, console)
    console.print(f"report: {md_path} ({json_path.name} beside it)", markup=False,
                  highlight=False)
    if not report.passed:
        error = failure(report)
        error.report = report  # the CLI's --json can still print the whole report
        raise error
    return report


def failure(report: ValidationReport) -> RunFailed:
    """RunFailed naming every failing node and check."""
    nodes: list[str] = []
    parts = []
    for c in report.failures:
        affected = report.nodes if c.node == checks_mod.CLUSTER else [c.node]
        nodes += [n for n in affected if n not in nodes]
        parts.append(f"{c.node} {c.check}: {c.message}")
    return RunFailed(f"validation failed ({len(parts)} check(s)): " + "; ".join(parts),
                     nodes=nodes, hint=f"report in {report.run_dir / 'report.md'}")


def _node_list(nodes: tuple[str, ...], total: int) -> str:
    if len(nodes) > 1 and len(nodes) == total:
        return f"all {total} nodes"
    return ", ".join(nodes)


def print_table(report: ValidationReport, console) -> None:
    """One screen: every check for small clusters, only what did not pass for large ones."""
    from rich.table import Table
    from rich.text import Text

    shown = report.checks
    if len(report.nodes) > FULL_TABLE_MAX_NODES:
        shown = [c for c in report.checks if c.status != checks_mod.PASS]
    table = Table(title=f"validate {report.cluster} ({report.profile})", title_justify="left")
    for col in ("node", "check", "value", "threshold", "result"):
        table.add_column(col, overflow="fold")
    style = {"pass": "green", "fail": "bold red", "skip": "yellow"}
    # Skips repeat one reason over many checks and nodes (every GPU check on a CPU node):
    # one row per reason and set of nodes, the reason in the value column.
    skipped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    by_check: dict[tuple[str, str], list[str]] = {}
    for c in shown:
        if c.status == checks_mod.SKIP:
            by_check.setdefault((c.check, c.message or "-"), []).append(c.node)
            continue
        table.add_row(Text(c.node), Text(c.check), Text(report_mod.format_value(c.value)),
                      Text(report_mod.format_value(c.threshold)),
                      Text(report_mod.STATUS_MARK[c.status], style=style[c.status]))
    for (check, reason), nodes in by_check.items():
        skipped.setdefault((reason, tuple(nodes)), []).append(check)
    for (reason, nodes), names in skipped.items():
        who = _node_list(nodes, len(report.nodes))
        table.add_row(Text(who), Text(", ".join(names)), Text(reason), Text("-"),
                      Text(report_mod.STATUS_MARK[checks_mod.SKIP], style=style["skip"]))
    console.print(table)
    counts = report.summary()
    console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
                  + ("" if shown is report.checks else " (passed checks not listed)"),
                  markup=False, highlight=False)
