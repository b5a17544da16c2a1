"""Per-host costs of provisioning, measured on the local sandbox, for docs/scale.md.

On one sandbox of N nodes (default 3): the first bootstrap, a converged re-run, and the
two halves of a node addition as they run on a converged cluster: site.yml limited to
one node (the new node's run; its cost on fresh hardware is the first bootstrap's per
host) and `--tags ssh_trust` on the other nodes (their trust refresh). For each run:
wall time, the control node's CPU time (ansible-playbook, its forks and ssh clients:
the children of this process), and from the runner's events the tasks evaluated per host
and the modules executed on each node (task results that ran a module on the node, not
on the control node). Prints a Markdown table and writes the figures as JSON.

    PYTHONPATH=. .venv/bin/python bench/scale_costs.py --nodes 3 --out scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from dsk_provision import sandbox
from dsk_provision.defaults import ansible_setting
from dsk_provision.inventory import load_inventory
from dsk_provision.runner import run_playbook

# Actions that Ansible runs on the control node only (no module on the node).
CONTROLLER_ACTIONS = {
    "set_fact", "debug", "assert", "fail", "include_vars", "include_tasks", "import_tasks",
    "include_role", "import_role", "meta", "validate_argument_spec", "add_host",
    "group_by", "set_stats", "pause",
}
RESULT_EVENTS = ("runner_on_ok", "runner_on_failed", "runner_on_skipped",
                 "runner_on_unreachable")


def _short(action: str) -> str:
    return action.rsplit(".", 1)[-1]


def event_counts(run_dir: Path) -> dict[str, dict[str, int]]:
    """{host: {"tasks": results, "skipped": n, "modules": module runs on the node}}."""
    out: dict[str, Counter] = {}
    durations: dict[str, list[float]] = {}
    for path in run_dir.glob("ansible/artifacts/*/job_events/*.json"):
        event = json.loads(path.read_text())
        if event.get("event") not in RESULT_EVENTS:
            continue
        data = event.get("event_data") or {}
        host = data.get("host")
        if not host:
            continue
        counts = out.setdefault(host, Counter())
        counts["tasks"] += 1
        if event["event"] == "runner_on_skipped":
            counts["skipped"] += 1
            continue
        res = data.get("res") or {}
        delegated = (res.get("_ansible_delegated_vars") or {}).get("ansible_host")
        if _short(data.get("task_action", "")) in CONTROLLER_ACTIONS:
            continue
        if delegated in ("localhost", "127.0.0.1"):
            continue
        if data.get("duration") is not None:
            durations.setdefault(host, []).append(float(data["duration"]))
        if isinstance(res, dict) and "results" in res:  # a loop: one module run per item
            counts["modules"] += sum(1 for r in res["results"]
                                     if isinstance(r, dict) and not r.get("skipped"))
        else:
            counts["modules"] += 1
    result: dict[str, dict] = {h: dict(c) for h, c in out.items()}
    for host, values in durations.items():
        # Seconds from the task's start on the host to its result, for tasks that ran a
        # module on the node: the latency one such task adds to a run on that host.
        result[host]["module_task_s_median"] = round(statistics.median(values), 3)
        result[host]["module_task_s_sum"] = round(sum(values), 1)
    return result


class MainProcessCpu:
    """Samples the CPU time of ansible-playbook's main process itself (not its forks):
    the strategy, result handling and callbacks run there, one core at most, so at scale
    it bounds a run whatever the forks. The last sample before it exits is kept."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> MainProcessCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        me = str(os.getpid())
        while not self._stop.wait(0.2):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                fields = stat[stat.rfind(")") + 2:].split()
                if b"ansible-playbook" in cmdline and fields[1] == me:
                    self.seconds = max(self.seconds, (int(fields[11]) + int(fields[12])) / tick)


def timed(label: str, inventory, runs_dir: Path, **kwargs) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with MainProcessCpu() as main_cpu:
        result = run_playbook("site.yml", inventory, command="bench-scale",
                              runs_dir=runs_dir, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    counts = event_counts(result.run_dir)
    hosts = sorted(counts)
    tasks = sum(c.get("tasks", 0) for c in counts.values())
    modules = sum(c.get("modules", 0) for c in counts.values())
    medians = [c["module_task_s_median"] for c in counts.values()
               if "module_task_s_median" in c]
    return {"run": label, "hosts": len(hosts), "wall_s": round(result.elapsed_s, 2),
            "control_cpu_s": round(cpu, 2),
            "main_process_cpu_s": round(main_cpu.seconds, 2),
            "tasks_per_host": round(tasks / max(1, len(hosts)), 1),
            "modules_per_host": round(modules / max(1, len(hosts)), 1),
            "control_cpu_ms_per_task": round(1000 * cpu / max(1, tasks), 1),
            "control_cpu_s_per_host": round(cpu / max(1, len(hosts)), 2),
            "module_task_s_median": round(statistics.median(medians), 3) if medians else None,
            "changed": sum(c.get("changed", 0) for c in result.recap.values()),
            "per_host": counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--name", default="bench", help="sandbox name")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--runs-dir", type=Path, default=Path(".dsk/bench-runs"))
    args = parser.parse_args()

    sandbox.down(args.name)
    info = sandbox.up(args.name, args.nodes)
    rows = []
    try:
        inv = load_inventory(info.inventory_path)
        names = [n.name for n in inv.nodes]
        new, others = names[-1], names[:-1]
        rows.append(timed("first bootstrap", inv, args.runs_dir))
        rows.append(timed("converged re-run", inv, args.runs_dir))
        rows.append(timed("one node, converged (--limit)", inv, args.runs_dir, limit=[new]))
        rows.append(timed("trust refresh of the others (--tags ssh_trust)", inv,
                          args.runs_dir, limit=others, tags=["ssh_trust"]))
    finally:
        sandbox.down(args.name)
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
              "nodes": args.nodes, "forks": int(ansible_setting("defaults", "forks") or 5),
              "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "python": platform.python_version(),
                       "load_before": os.getloadavg()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| run | hosts | wall (s) | control CPU (s) | main process (s) | CPU per host (s) "
          "| tasks per host | CPU per task (ms) | modules per host | module task (s, median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['hosts']} | {r['wall_s']:.1f} | {r['control_cpu_s']:.1f} "
              f"| {r['main_process_cpu_s']:.1f} | {r['control_cpu_s_per_host']:.2f} "
              f"| {r['tasks_per_host']:.0f} "
              f"| {r['control_cpu_ms_per_task']:.0f} | {r['modules_per_host']:.0f} "
              f"| {r['module_task_s_median'] or 0:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
