"""`dsk-provision validate`: per-node health checks + an all-reduce benchmark -> report.

1. thresholds from the hardware profile, the inventory's ``dsk_thresholds`` and the caller
   (bad names or values are InputErrors before anything runs);
2. the ``validate.yml`` playbook writes one facts JSON per node into ``<run>/facts/``;
3. ``trainer.bench.allreduce`` runs under torchrun across every node, rank 0 writes JSON;
4. checks (``dsk_provision.checks``) judge facts and benchmark; ``report.json`` and
   ``report.md`` land in the run directory; a table is printed;
5. RunFailed names the failing node(s) and check(s).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsk_provision import checks as checks_mod
from dsk_provision import report as report_mod
from dsk_provision.errors import InputError, RunFailed

_SIZE_RE = re.compile(r"^\d+[KMG]?$", re.IGNORECASE)
BENCH_MODULE = "trainer.bench.allreduce"
BENCH_JSON = "allreduce.json"
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
        }


def _check_size(value: str, name: str) -> str:
    if not _SIZE_RE.match(str(value)):
        raise InputError(f"{value!r} is not a size (use e.g. 1K, 16M, 8G)", field=name)
    return str(value)


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


def _run_benchmark(inventory, run_dir: Path, args: list[str], console, timeout_s, transport):
    from dsk_provision.launch import fetch_first, run_torchrun

    try:
        run_torchrun(inventory, BENCH_MODULE, args, run_dir=run_dir, console=console,
                     timeout_s=timeout_s, transport=transport)
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


def validate(inventory, *, runs_dir: Path | None = None, begin: str = "1K",
             end: str | None = None, factor: int = 2, console=None,
             thresholds: dict | None = None, warmup: int = 5, iters: int = 20,
             timeout_s: float | None = 1800, transport=None) -> ValidationReport:
    """Validate the cluster; returns the report, raises RunFailed when a check fails.

    ``end`` defaults to the profile's benchmark size (16M on the sandbox, 8G on GPU
    profiles, where busbw needs large messages to approach link speed).
    """
    from dsk_provision import rundir
    from dsk_provision.runner import run_playbook

    profile_name, merged = checks_mod.resolve_thresholds(inventory, thresholds)
    profile = checks_mod.read_profile(profile_name)
    end = _check_size(end or profile["benchmark"].get("end", "16M"), "end")
    begin = _check_size(begin, "begin")
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
    for name in names:
        results = checks_mod.run_node_checks(name, facts[name], merged)
        if facts[name] is None and playbook_error is not None:
            results[0].message += f": {str(playbook_error).splitlines()[0]}"
        report.checks += results

    missing = [n for n in names if facts[n] is None]
    if missing:
        report.checks += checks_mod.run_benchmark_checks(
            None, merged, len(names),
            error=f"not run: no facts from {', '.join(missing)}")
    else:
        args = ["--begin", begin, "--end", end, "--factor", str(int(factor)),
                "--warmup", str(int(warmup)), "--iters", str(int(iters)),
                "--json-out", BENCH_JSON]
        try:
            report.allreduce = _run_benchmark(inventory, run_dir, args, console, timeout_s,
                                              transport)
            report.checks += checks_mod.run_benchmark_checks(report.allreduce, merged,
                                                             len(names))
        except (RunFailed, json.JSONDecodeError) as exc:
            report.checks += checks_mod.run_benchmark_checks(None, merged, len(names),
                                                             error=str(exc).splitlines()[0])

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
    for c in shown:
        table.add_row(Text(c.node), Text(c.check), Text(report_mod.format_value(c.value)),
                      Text(report_mod.format_value(c.threshold)),
                      Text(report_mod.STATUS_MARK[c.status], style=style[c.status]))
    console.print(table)
    counts = report.summary()
    console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
                  + ("" if shown is report.checks else " (passed checks not listed)"),
                  markup=False, highlight=False)
