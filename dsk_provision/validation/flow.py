"""`dsk-provision validate`: per-node health checks + benchmarks -> report.

1. thresholds from the hardware profile, the inventory's ``dsk_thresholds`` and the caller
   (bad names or values are InputErrors before anything runs);
2. the ``validate.yml`` playbook writes one facts JSON per node into ``<run>/facts/``;
   the node checks (GPU, versions against the inventory's pins, fabric, disk, memory,
   clock) judge them;
3. the compute probe measures matmul and memory copy on every node (``probes``);
4. the all-reduce probe runs within each node (one process per GPU; skipped on a
   node of one process), then across every node; nccl-tests' ``all_reduce_perf`` runs
   within each node where it is installed, with the same sizes, for comparison;
5. a cross-node busbw below its threshold on two or more nodes starts isolation
   (``isolation``): pairs of nodes, and the slow node or link is named;
6. ``report.json``, ``report.md`` and ``allreduce_busbw.png`` land in the run directory;
   a table is printed; RunFailed names the failing node(s) and check(s).
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsk_provision import slurmctl
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.launch import nproc_for
from dsk_provision.lock import holds_cluster_lock
from dsk_provision.sizes import read_size
from dsk_provision.validation import bench_checks, isolation, node_checks, probes, slurm_checks
from dsk_provision.validation import report as report_files
from dsk_provision.validation.profiles import read_profile, resolve_thresholds
from dsk_provision.validation.results import CLUSTER, FAIL, PASS, SKIP, CheckResult

PLOT_FILE = "allreduce_busbw.png"
# Above this many nodes the printed table shows only what did not pass.
FULL_TABLE_MAX_NODES = 8


@dataclass
class ValidationReport:
    run_dir: Path
    cluster: str
    profile: str
    nodes: list[str]
    thresholds: dict[str, Any]
    checks: list[CheckResult] = field(default_factory=list)
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
    def failures(self) -> list[CheckResult]:
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


def _intra_node(inventory, run_dir, args, console, timeout_s, transport, merged, report):
    """The all-reduce within each node: nproc = its GPUs; one-process nodes are skipped."""
    todo = []
    for node in inventory.nodes:
        procs = nproc_for(node)
        if procs < 2:
            why = ("one process on this node (no GPUs): nothing moves within it"
                   if not node.gpus else "one GPU on this node: nothing moves within it")
            report.checks.append(CheckResult(node.name, "allreduce_intra", SKIP, None, None,
                                             why))
        else:
            todo.append(node)

    def one(node):
        sub = probes.subset(inventory, [node.name])
        return node.name, probes.allreduce_or_error(
            sub, probes.step_dir(run_dir, f"intra-{node.name}"), args, console, timeout_s,
            transport)

    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
        for name, (bench, error) in pool.map(one, todo):
            if bench is None:
                report.checks.append(CheckResult(name, "allreduce_intra", FAIL, None, None,
                                                 error))
                continue
            report.intra_node[name] = bench
            report.checks.append(bench_checks.check_allreduce_correct(
                bench, merged, node=name, check="allreduce_intra_correct"))
            report.checks.append(bench_checks.check_allreduce_busbw(
                bench, merged, 1, node=name, check="allreduce_intra"))


def _isolate(inventory, run_dir, args, console, timeout_s, transport, merged, report) -> None:
    minimum = bench_checks.busbw_threshold(merged, 2)
    names = [n.name for n in inventory.nodes]

    def measure(pair):
        sub = probes.subset(inventory, list(pair))
        bench, _ = probes.allreduce_or_error(
            sub, probes.step_dir(run_dir, f"pair-{pair[0]}-{pair[1]}"), args, console,
            timeout_s, transport)
        row = bench_checks.largest_row(bench) if bench else None
        return None if row is None else bench_checks.row_busbw(row)

    console.print(f"isolating: all-reduce on pairs of nodes ({minimum:g} GB/s expected)",
                  markup=False, highlight=False)
    verdict = isolation.isolate(names, measure, minimum)
    report.isolation = verdict.to_dict()
    report.checks += isolation.isolation_checks(verdict, names, minimum,
                                                 str(inventory.path))


def _plot(report: ValidationReport, console) -> None:
    from dsk_provision.validation import plots

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


@holds_cluster_lock("validate")
def validate(inventory, *, runs_dir: Path | None = None, begin: str = "1K",
             end: str | None = None, factor: int = 2, console=None,
             thresholds: dict | None = None, warmup: int = 5, iters: int = 20,
             timeout_s: float | None = 1800, transport=None, perf: bool = True,
             perf_args: list[str] | None = None, intra_node: bool = True,
             nccl_tests: bool = True, isolate: bool = True,
             only: list[str] | None = None) -> ValidationReport:
    """Validate the cluster; returns the report, raises RunFailed when a check fails.

    ``end`` defaults to the profile's benchmark size (16M on the sandbox, 8G on GPU
    profiles, where busbw needs large messages to approach link speed). ``perf``,
    ``intra_node``, ``nccl_tests`` and ``isolate`` turn those steps off (tests use it);
    ``perf_args`` go to the compute probe (e.g. ["--size", "1024"]). ``only``: the node
    checks and per-node benchmarks of these nodes alone (nodes just brought in); the
    cluster-wide all-reduce still spans every node in service.
    """
    from dsk_provision import rundir
    from dsk_provision.runner import run_playbook

    profile_name, merged = resolve_thresholds(inventory, thresholds)
    profile = read_profile(profile_name)
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
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown or not only:
            raise InputError(f"no node {', '.join(unknown)} in the inventory" if unknown
                             else "no node to validate", field="only")
    checked = [n for n in names if only is None or n in only]
    run_dir = rundir.new_run_dir("validate", runs_dir)
    report = ValidationReport(run_dir=run_dir, cluster=str(inventory.vars.get(
        "dsk_cluster_name", "cluster")), profile=profile_name, nodes=names, thresholds=merged,
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    started = time.monotonic()

    # The playbook writes the facts into this run directory; ansible-runner's own
    # artifacts go into a run directory nested under it.
    playbook_error: RunFailed | None = None
    try:
        limited = {} if only is None else {"limit": checked}
        run_playbook("validate.yml", inventory, command="validate", runs_dir=run_dir / "playbook",
                     extra_vars={"dsk_run_dir": str(run_dir.resolve())}, console=console,
                     **limited)
    except RunFailed as exc:
        playbook_error = exc

    facts = read_facts(run_dir, checked)
    for node in inventory.nodes:
        if node.name not in facts:
            continue
        results = node_checks.run_node_checks(node.name, facts[node.name], merged,
                                              node_checks.node_pins(node))
        if facts[node.name] is None and playbook_error is not None:
            results[0].message += f": {str(playbook_error).splitlines()[0]}"
        report.checks += results

    if slurmctl.enabled(inventory):
        report.checks += slurm_checks.run_slurm_checks(inventory, transport=transport)

    # Cordoned nodes get their node checks (they help the repair) but no benchmark:
    # everything below runs on the nodes in service.
    for node in inventory.nodes:
        if node.cordoned:
            report.checks.append(CheckResult(
                node.name, "cordoned", SKIP, None, None,
                f"cordoned ({node.cordoned}): left out of the benchmarks and the "
                "cluster-wide all-reduce"))
    inventory = inventory.in_service()
    names = [n.name for n in inventory.nodes]
    missing = [n for n in names if n in facts and facts[n] is None]
    # The per-node benchmarks run on the checked nodes; the all-reduce on every node.
    own = inventory if only is None else dataclasses.replace(
        inventory, nodes=[n for n in inventory.nodes if n.name in facts])
    args = probes.allreduce_args(begin, end, factor, warmup, iters)
    if missing:
        report.checks += bench_checks.run_benchmark_checks(
            None, merged, len(names),
            error=f"not run: no facts from {', '.join(missing)}")
    else:
        if perf:
            results, error = probes.run_gpu_perf(own, run_dir, console, timeout_s, transport,
                                          perf_args)
            for name, result in results.items():
                if result is not None:
                    report.gpu_perf[name] = result
                report.checks += bench_checks.run_perf_checks(name, result, merged, error)
        if intra_node and len(names) > 1 and own.nodes:
            _intra_node(own, run_dir, args, console, timeout_s, transport, merged, report)
        if nccl_tests:
            outcomes = probes.run_nccl_tests(inventory, run_dir, begin, end, factor, warmup,
                                             iters, transport, timeout_s or 1800)
            report.nccl_tests.update({name: value for name, (kind, value) in outcomes.items()
                                      if kind == "ok"})
            report.checks += bench_checks.nccl_tests_checks(outcomes, merged)
        report.allreduce, error = probes.allreduce_or_error(inventory, run_dir, args, console,
                                                  timeout_s, transport)
        report.checks += bench_checks.run_benchmark_checks(report.allreduce, merged, len(names),
                                                         error=error)
        busbw = next((c for c in report.checks if c.node == CLUSTER
                      and c.check == "allreduce_busbw"), None)
        if isolate and busbw is not None and busbw.failed and len(names) >= 2:
            _isolate(inventory, run_dir, args, console, timeout_s, transport, merged, report)

    _plot(report, console)
    report.elapsed_s = time.monotonic() - started
    json_path, md_path = report_files.write_reports(report.to_dict(), run_dir)
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
    cordoned = {c.node for c in report.checks if c.check == "cordoned"}
    for c in report.failures:
        affected = ([n for n in report.nodes if n not in cordoned] if c.node == CLUSTER
                    else [c.node])
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
        shown = [c for c in report.checks if c.status != PASS]
    style = {"pass": "green", "fail": "bold red", "skip": "yellow"}
    rows: list[tuple[str, str, str, str, str]] = []
    # Skips repeat one reason over many checks and nodes (every GPU check on a CPU node):
    # one row per reason and set of nodes, the reason in the value column.
    skipped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    by_check: dict[tuple[str, str], list[str]] = {}
    for c in shown:
        if c.status == SKIP:
            by_check.setdefault((c.check, c.message or "-"), []).append(c.node)
            continue
        rows.append((c.node, c.check, report_files.format_value(c.value),
                     report_files.format_value(c.threshold), c.status))
    for (check, reason), nodes in by_check.items():
        skipped.setdefault((reason, tuple(nodes)), []).append(check)
    for (reason, nodes), names in skipped.items():
        rows.append((_node_list(nodes, len(report.nodes)), ", ".join(names), reason, "-", SKIP))

    # A check's name is not broken across lines where the terminal leaves room for it
    # (80 columns do): value and threshold share what the other columns leave, and fold.
    table = Table(title=f"validate {report.cluster} ({report.profile})", title_justify="left")
    widest_check = max((len(c.check) for c in shown), default=0)
    widest_node = max((len(row[0]) for row in rows), default=0)
    frame = 16  # six borders and one space either side of each of the five columns
    rest = console.width - frame - widest_node - widest_check - len("result")
    keep_names = rest >= 2 * 8
    for col in ("node", "check", "value", "threshold", "result"):
        table.add_column(
            col, overflow="fold",
            min_width=widest_check if col == "check" and keep_names else None,
            max_width=rest // 2 if col in ("value", "threshold") and keep_names else None)
    for node, check, value, threshold, status in rows:
        table.add_row(Text(node), Text(check), Text(value), Text(threshold),
                      Text(report_files.STATUS_MARK[status], style=style[status]))
    console.print(table)
    counts = report.summary()
    console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
                  + ("" if shown is report.checks else " (passed checks not listed)"),
                  markup=False, highlight=False)
