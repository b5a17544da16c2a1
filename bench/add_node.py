"""Time to add one node to a cluster of 2 and of 8, on the local sandbox, in one run.

For each size N: `sandbox up` with N nodes and one spare (running, not in the inventory),
the first bootstrap (dsk_provision.lifecycle.bring_in, which records the provisioned
nodes), then `nodes add` of the spare as the CLI does it (lifecycle.add: the SSH probe of
the new node, the inventory edit, the new node's full bootstrap, the existing nodes'
trust refresh), then, unless --no-validate, validate's checks of the new node and an
all-reduce across the N + 1 nodes (timed apart: it is not part of the addition's target).
The sandbox is taken down after each size, also when a step fails.

Reported per size: the addition's wall time and its parts (the new node's run, the trust
refresh, the rest: probe, host-key check, inventory edit, records), the control node's CPU
time of each run, and from the trust refresh's events the tasks and module runs on each
existing node. Prints Markdown tables and writes the figures as JSON.

    PYTHONPATH=. .venv/bin/python bench/add_node.py --sizes 2 8 --name scl --out add_node.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from scale_costs import event_counts

from dsk_provision import lifecycle, sandbox
from dsk_provision.errors import DskError
from dsk_provision.inventory import load_inventory
from dsk_provision.inventory_edit import NewNode
from dsk_provision.runner import run_playbook

# The target: adding a node to 8 takes at most this many times as long as adding one to 2.
TARGET_RATIO = 1.3


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class TimedRuns:
    """A playbook runner for lifecycle.add that keeps each run's command, wall time,
    elapsed time as the runner measured it, control-node CPU time and run directory."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def __call__(self, playbook: str, inventory, **kwargs):
        cpu, t0 = _children_cpu(), time.perf_counter()
        entry = {"command": kwargs.get("command"), "limit": kwargs.get("limit"),
                 "tags": kwargs.get("tags")}
        self.runs.append(entry)
        try:
            result = run_playbook(playbook, inventory, **kwargs)
        except DskError as exc:
            entry["error"] = str(exc)
            record = getattr(exc, "record", None) or {}
            entry["run_dir"] = record.get("run_dir")
            raise
        finally:
            entry["wall_s"] = round(time.perf_counter() - t0, 2)
            entry["control_cpu_s"] = round(_children_cpu() - cpu, 2)
        entry["elapsed_s"] = result.elapsed_s
        entry["run_dir"] = str(result.run_dir)
        return result

    def one(self, command: str) -> dict:
        found = [r for r in self.runs if r["command"] == command]
        return found[-1] if found else {}


def _console(buffer: io.StringIO) -> Console:
    return Console(file=buffer, width=120, force_terminal=False)


def measure(size: int, name: str, runs_dir: Path, validate: bool) -> dict:
    row: dict = {"nodes": size, "load_before": [round(x, 2) for x in os.getloadavg()]}
    sandbox.down(name)
    try:
        t0 = time.perf_counter()
        info = sandbox.up(name, size, spare=1)
        row["sandbox_up_s"] = round(time.perf_counter() - t0, 2)
        (spare, address), = info.spare
        inventory = load_inventory(info.inventory_path)

        text = io.StringIO()
        t0 = time.perf_counter()
        lifecycle.bring_in(inventory, say=lambda m: print(m, file=text), runs_dir=runs_dir,
                           console=_console(text))
        row["first_bootstrap_s"] = round(time.perf_counter() - t0, 2)
        row["first_bootstrap_lines"] = len(text.getvalue().splitlines())

        runs = TimedRuns()
        said: list[str] = []
        text = io.StringIO()
        t0 = time.perf_counter()
        outcome, larger = lifecycle.add(inventory, [NewNode(spare, address)], run=runs,
                                        say=said.append, runs_dir=runs_dir,
                                        console=_console(text))
        row["add_s"] = round(time.perf_counter() - t0, 2)
        row["add_lines"] = len(text.getvalue().splitlines()) + len(said)
        row["plan"] = said[0] if said else ""
        row["missed"] = outcome.missed
        new_run, refresh = runs.one("bootstrap"), runs.one("trust-refresh")
        row["new_node_run"] = new_run
        row["trust_refresh"] = refresh
        row["other_s"] = round(row["add_s"] - new_run["wall_s"] - refresh["wall_s"], 2)
        existing = [n.name for n in inventory.nodes]
        per_host = event_counts(Path(refresh["run_dir"]))
        row["refresh_per_existing_node"] = {h: per_host.get(h, {}) for h in existing}
        new_hosts = event_counts(Path(new_run["run_dir"]))
        # What the new node's run did on existing nodes (nothing is expected: their host
        # keys come from the record).
        row["new_run_on_existing_nodes"] = {h: c for h, c in new_hosts.items()
                                            if h in existing}
        row["new_run_on_new_node"] = new_hosts.get(spare, {})

        if validate:
            from dsk_provision.validation.flow import validate as run_validate

            t0 = time.perf_counter()
            try:
                report = run_validate(larger, runs_dir=runs_dir,
                                      console=_console(io.StringIO()), only=[spare])
                row["validation"] = {"run": True, "passed": bool(report.passed)}
            except DskError as exc:
                row["validation"] = {"run": True, "passed": False,
                                     "error": str(exc).splitlines()[0]}
            row["validation"]["wall_s"] = round(time.perf_counter() - t0, 2)
        else:
            row["validation"] = {"run": False}
        row["load_after"] = [round(x, 2) for x in os.getloadavg()]
        return row
    finally:
        t0 = time.perf_counter()
        sandbox.down(name)
        print(f"  {name} down in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def _tasks(counts: dict) -> str:
    """'ran / skipped / modules' of one node's task results."""
    tasks, skipped = counts.get("tasks", 0), counts.get("skipped", 0)
    return f"{tasks - skipped} / {skipped} / {counts.get('modules', 0)}"


def report(rows: list[dict]) -> None:
    print("| cluster | addition (s) | new node's run (s) | trust refresh (s) | rest (s) "
          "| refresh CPU (s) | validation (s) | tasks per existing node (run / skipped / "
          "modules) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        per = {_tasks(c) for c in r["refresh_per_existing_node"].values()}
        v = r["validation"]
        valid = (f"{v['wall_s']:.1f} ({'passed' if v['passed'] else 'failed'})"
                 if v["run"] else "not run")
        print(f"| {r['nodes']} + 1 | {r['add_s']:.1f} | {r['new_node_run']['wall_s']:.1f} "
              f"| {r['trust_refresh']['wall_s']:.1f} | {r['other_s']:.1f} "
              f"| {r['trust_refresh']['control_cpu_s']:.1f} | {valid} "
              f"| {', '.join(sorted(per))} |")
    by = {r["nodes"]: r for r in rows}
    if 2 in by and 8 in by:
        ratio = by[8]["add_s"] / by[2]["add_s"]
        verdict = "met" if ratio <= TARGET_RATIO else "not met"
        print(f"\naddition 8 / 2: {ratio:.2f}x (target {TARGET_RATIO}x: {verdict})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--name", default="addnode",
                        help="sandbox name prefix: the size is appended (addnode2, ...)")
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                        help="validate the new node after the addition (timed apart)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/add_node.json"))
    parser.add_argument("--runs-dir", type=Path, default=Path(".dsk/bench-runs"))
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        print(f"adding a node to {size}...", file=sys.stderr)
        rows.append(measure(size, f"{args.name}{size}", args.runs_dir, args.validate))
        print(f"  {json.dumps(rows[-1])}", file=sys.stderr)
    by = {r["nodes"]: r for r in rows}
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
              "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "python": platform.python_version()},
              "target_ratio": TARGET_RATIO,
              "ratio_8_to_2": (round(by[8]["add_s"] / by[2]["add_s"], 2)
                               if 2 in by and 8 in by else None),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
