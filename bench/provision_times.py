"""Provisioning times against node count, on the local sandbox.

For each node count: `sandbox up` (base image already cached), the first bootstrap, an
idempotent re-run (which must report changed=0 on every host), and the floor: a playbook
of one command per host and no facts (bench/one_module.yml), the least a re-run that
looks at every node can do. The sandbox is taken down between counts. Also counts the
lines each bootstrap prints on a console that is not a terminal (as in CI or a pipe; the
text is kept in the runs directory as console-<nodes>-<first|rerun>.txt). Prints a
Markdown table and writes the raw figures as JSON.

    .venv/bin/python bench/provision_times.py --nodes 1 3 8 --out bench/results/provision.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from dsk_provision import sandbox
from dsk_provision.inventory import load_inventory
from dsk_provision.runner import run_playbook

ONE_MODULE = Path(__file__).resolve().parent / "one_module.yml"


def measure(nodes: int, runs_dir: Path, name: str = "bench") -> dict:
    sandbox.down(name)
    t0 = time.perf_counter()
    info = sandbox.up(name, nodes)
    up_s = time.perf_counter() - t0
    try:
        inventory = load_inventory(info.inventory_path)
        first, first_lines = _bootstrap(inventory, runs_dir, f"console-{nodes}-first.txt")
        second, rerun_lines = _bootstrap(inventory, runs_dir, f"console-{nodes}-rerun.txt")
        changed = {host: counts.get("changed", 0) for host, counts in second.recap.items()}
        if any(changed.values()):
            raise SystemExit(f"the re-run on {nodes} nodes changed something: {changed}")
        floor = min(run_playbook(str(ONE_MODULE), inventory, command="bench-floor",
                                 runs_dir=runs_dir).elapsed_s for _ in range(3))
        return {
            "nodes": nodes,
            "sandbox_up_s": round(up_s, 2),
            "first_bootstrap_s": round(first.elapsed_s, 2),
            "rerun_s": round(second.elapsed_s, 2),
            "rerun_changed": sum(changed.values()),
            "one_module_s": round(floor, 2),
            "first_bootstrap_lines": first_lines,
            "rerun_lines": rerun_lines,
        }
    finally:
        t0 = time.perf_counter()
        sandbox.down(name)
        print(f"  down in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def _bootstrap(inventory, runs_dir: Path, keep: str):
    """One bootstrap, its console captured as a non-terminal: (result, lines printed)."""
    text = io.StringIO()
    console = Console(file=text, width=120, force_terminal=False)
    try:
        result = run_playbook("site.yml", inventory, command="bootstrap", runs_dir=runs_dir,
                              console=console)
    finally:
        runs_dir.mkdir(parents=True, exist_ok=True)
        (runs_dir / keep).write_text(text.getvalue())
    return result, len(text.getvalue().splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--out", type=Path, default=Path("bench/results/provision.json"))
    parser.add_argument("--runs-dir", type=Path, default=Path(".dsk/bench-runs"))
    parser.add_argument("--name", default="bench", help="sandbox name")
    args = parser.parse_args()

    rows = []
    for n in args.nodes:
        print(f"measuring {n} node(s)...", file=sys.stderr)
        rows.append(measure(n, args.runs_dir, args.name))
        print(f"  {rows[-1]}", file=sys.stderr)

    base = next((r for r in rows if r["nodes"] == 1), None)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "host": {"cpus": _cpus(), "kernel": platform.release(),
                 "python": platform.python_version()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print("| nodes | sandbox up (s) | first bootstrap (s) | idempotent re-run (s) "
          "| re-run vs 1 node | one module per host (s) | vs 1 node "
          "| console lines (first / re-run) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['rerun_s'] / base['rerun_s']:.2f}x" if base else "-"
        floor = f"{r['one_module_s'] / base['one_module_s']:.2f}x" if base else "-"
        print(f"| {r['nodes']} | {r['sandbox_up_s']:.1f} | {r['first_bootstrap_s']:.1f} "
              f"| {r['rerun_s']:.1f} | {ratio} | {r['one_module_s']:.2f} | {floor} "
              f"| {r['first_bootstrap_lines']} / {r['rerun_lines']} |")
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
