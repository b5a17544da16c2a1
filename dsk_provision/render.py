"""What the command line shows: its consoles, result tables, summaries and JSON output.

Everything printed here is data (paths, host names, addresses, package names), so rich
markup and highlighting are off on the consoles themselves: a bracket in a path prints
as written. Results go to stdout; errors, notes and progress that must not mix with
``--json`` output go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


@functools.cache
def console(*, stderr: bool = False) -> Console:
    """The one stdout console (or, with ``stderr``, the one stderr console)."""
    from rich.console import Console

    return Console(stderr=stderr, markup=False, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def error(message: str) -> None:
    console(stderr=True).print(f"error: {message}", soft_wrap=True)


def line(message: str) -> None:
    """One plain line on stdout."""
    console().print(message)


def progress(out: Console) -> Callable[[str], None]:
    """A progress callback for library functions: one indented line per message."""
    return lambda message: out.print(f"  {message}")


# ---------------------------------------------------------------------------- check

def inventory_json(inv, config: Path | None) -> dict[str, Any]:
    return {
        "inventory": str(inv.path), "cluster": inv.cluster_name, "profile": inv.profile,
        "total_gpus": inv.total_gpus, "config": str(config) if config else None,
        "nodes": [{"name": n.name, "address": n.address, "port": n.port,
                   "user": n.user, "gpus": n.gpus, "cordoned": n.cordoned}
                  for n in inv.nodes],
    }


def inventory_summary(inv, config: Path | None) -> None:
    """The nodes in rank order, then one line on the cluster (and one on the config)."""
    from rich.table import Table

    out = console()
    table = Table(title=f"cluster {inv.cluster_name} ({inv.path})", title_justify="left")
    cordoned = [n for n in inv.nodes if n.cordoned]
    columns = ("rank", "node", "address", "port", "user", "gpus") + (
        ("cordoned",) if cordoned else ())
    for col in columns:
        table.add_column(col, justify="right" if col in ("rank", "port", "gpus") else "left")
    ranks = {n.name: rank for rank, n in enumerate(inv.active_nodes)}
    for n in inv.nodes:
        row = [str(ranks[n.name]) if n.name in ranks else "-", n.name, n.address, str(n.port),
               n.user or "-", str(n.gpus)]
        table.add_row(*row, *([n.cordoned or ""] if cordoned else []))
    out.print(table)
    active = inv.active_nodes
    where = (f"rendezvous on {active[0].name}" if active else "every node is cordoned")
    out.print(f"{len(inv.nodes)} node(s), {inv.total_gpus} GPU(s), profile "
              f"{inv.profile or '-'}; {where}"
              + (f"; {len(cordoned)} cordoned" if cordoned else "") + ": inventory OK")
    if config is not None:
        out.print(f"training config {config}: OK")


def warnings(lines: Iterable[str]) -> None:
    """Problems that do not stop a run, one line each, on stderr."""
    err = console(stderr=True)
    for line in lines:
        err.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------- validate

def validate_verdict(report) -> None:
    verdict = "PASSED" if report.passed else "FAILED"
    console().print(f"validate {verdict}; report in {report.run_dir}")


# ---------------------------------------------------------------------------- sandbox

def sandbox_up(name: str, info) -> None:
    """The new sandbox's inventory, and the commands that take it from here."""
    out = console()
    inv = info.inventory_path
    out.print(f"sandbox {name} is up with {len(info.nodes)} node(s); inventory: {inv}")
    spare = list(getattr(info, "spare", None) or [])
    if spare:
        out.print(f"spare nodes, running but not in the inventory: "
                  f"{', '.join(f'{n} ({ip})' for n, ip in spare)}")
    out.print("next:")
    adds = [f"dsk-provision nodes add -i {inv} {spare[0][0]} --host {spare[0][1]}"] \
        if spare else []
    for cmd in (f"dsk-provision check -i {inv}", f"dsk-provision bootstrap -i {inv}",
                *adds, f"dsk-provision validate -i {inv}",
                f"dsk-provision train -i {inv} --config trainer/configs/tiny.toml",
                f"dsk-provision sandbox down --name {name}"):
        out.print(f"  {cmd}")


def sandbox_down(name: str) -> None:
    console().print(f"sandbox {name} is down")


def sandbox_status(rows: list[dict[str, Any]], name: str | None) -> None:
    """One table row per node (the sandbox's own columns on its first node's row), then
    where each sandbox's inventory is."""
    out = console()
    if not rows:
        out.print("no sandbox" + (f" named {name}" if name else "") + " is running")
        return
    from rich.table import Table

    table = Table()
    for col in ("sandbox", "subnet", "mirror", "node", "address", "state"):
        table.add_column(col)
    for row in rows:
        nodes = row.get("nodes") or [{}]
        for i, node in enumerate(nodes):
            node = node if isinstance(node, dict) else {"name": node}
            head = (row.get("name"), row.get("subnet"), row.get("mirror")) if i == 0 \
                else ("", "", "")
            spare = " (spare)" if node.get("name") in (row.get("spare") or ()) else ""
            table.add_row(*(_cell(v) for v in head), _cell(node.get("name")),
                          _cell(node.get("ip")), _cell(node.get("state")) + spare)
    out.print(table)
    for row in rows:
        inv = row.get("inventory_path") or row.get("inventory")
        if inv:
            out.print(f"{row.get('name')}: inventory {inv}", soft_wrap=True)


def sandbox_link(name: str, node: str, rate: str | None) -> None:
    state = "restored" if rate is None else f"limited to {rate}"
    console().print(f"sandbox {name}: link of {node} {state}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


# ---------------------------------------------------------------------------- mirror

def mirror_notes(notes: Iterable[str]) -> None:
    err = console(stderr=True)
    for note in notes:
        err.print(f"note: {note}", soft_wrap=True)


def mirror_built(manifest: dict[str, Any], out_dir: Path) -> None:
    """What the mirror holds and where, and how to serve it."""
    out = console()
    for os_id, apt in manifest["apt"].items():
        out.print(f"{os_id}: {len(apt['packages'])} apt packages in {out_dir / apt['path']}")
    if manifest["wheels"]:
        out.print(f"wheels: {len(manifest['wheels']['files'])} files in "
                  f"{out_dir / manifest['wheels']['path']}")
    if (manifest.get("signing_key") or {}).get("fingerprint"):
        out.print(f"signed by key {manifest['signing_key']['fingerprint']}")
    out.print(f"serve it: dsk-provision mirror serve --dir {out_dir} --bind ADDRESS")


def mirror_serving(directory: Path, url: str,
                   settings: Iterable[tuple[str, str, str]]) -> None:
    """Where the mirror is served, and the inventory variables that point nodes at it."""
    out = console()
    out.print(f"serving {directory} on {url} (Ctrl-C stops it)")
    out.print("inventory settings (all.vars, or per group when nodes differ):")
    for var, value, comment in settings:
        out.print(f"  {var}: {value}    # {comment}")


# ---------------------------------------------------------------------------- hostkeys

def host_keys_plan(plan, out=None) -> None:
    """The scanned keys as `ssh-keygen -lf` prints the known_hosts lines they make (the
    node's name and address as comment), by what happens to them; refusals and
    unreachable nodes are left to the error. On ``out`` (default: stdout)."""
    out = out or console()
    groups = (("new host keys, not pinned yet (compare them with the nodes' consoles):",
               plan.new),
              (f"already pinned in {plan.known_hosts}:", plan.known),
              ("pinned under an old address, pinned again under the new one:",
               plan.moved),
              ("left out (no expected fingerprint vouches for them):", plan.unvouched))
    for title, pairs in groups:
        if pairs:
            out.print(title, soft_wrap=True)
            for target, key in pairs:
                out.print(f"  {key.fingerprint_line(','.join(target.known_hosts_names))}",
                          soft_wrap=True)
    for target in plan.replaced:
        out.print(f"{target.name}: its recorded keys will be replaced by the ones above")


def host_keys_confirm(plan) -> bool:
    """Ask on the terminal (stderr, answer on stdin) whether to pin the new keys; no
    answer (end of input) is no."""
    err = console(stderr=True)
    err.print(f"pin these {len(plan.new)} key(s) in {plan.known_hosts}? [y/N] ", end="",
              soft_wrap=True)
    answer = sys.stdin.readline()
    if not answer or not sys.stdin.isatty():
        err.print("")  # the answer was not echoed: end the prompt's line
    return answer.strip().lower() in ("y", "yes")


def host_keys_done(plan) -> None:
    moved = sorted({t.name for t, _ in plan.moved})
    if moved:
        console().print(f"pinned again under the new address: {', '.join(moved)}",
                        soft_wrap=True)
    if plan.new:
        console().print(f"pinned {len(plan.new)} key(s) of "
                        f"{len({t.name for t, _ in plan.new})} node(s) in {plan.known_hosts}")
    elif not moved:
        console().print(f"nothing to pin: every key is already in {plan.known_hosts}")


# ---------------------------------------------------------------------------- init

def inventory_written(result) -> None:
    out = console()
    s = result.settings
    out.print(f"wrote {result.hosts_file} and {result.directory / 'group_vars' / 'all.yml'}: "
              f"cluster {s.cluster_name}, {result.nodes} node(s), {s.gpus_per_node} GPU(s) "
              f"per node, profile {s.profile or '(not chosen)'}", soft_wrap=True)
    if result.facts:
        for node, facts in result.facts.items():
            out.print(f"  {node}: {facts.summary()}", soft_wrap=True)
    warnings(result.notes)
    out.print("next:")
    if not result.facts:
        out.print(f"  dsk-provision hostkeys scan -i {result.directory}", soft_wrap=True)
    for cmd in (f"dsk-provision check -i {result.directory}",
                f"dsk-provision bootstrap -i {result.directory}"):
        out.print(f"  {cmd}", soft_wrap=True)


# ---------------------------------------------------------------------------- keys

def keys_rotated(result) -> None:
    """What a finished rotation changed, in a few lines."""
    out = console()
    data = result.to_dict()
    if data["resumed"]:
        out.print(f"finished a rotation resumed at its {data['resumed']} step")
    out.print(f"cluster key rotated on {len(data['nodes'])} node(s): {data['new_key']} "
              f"(in {data['key_dir']}); {data['old_key']} removed from every node's "
              "authorized_keys", soft_wrap=True)


# ---------------------------------------------------------------------------- status

def cluster_status(result) -> None:
    """The status table, then one line: how many nodes answered."""
    from rich.table import Table

    from dsk_provision.status import TABLE_HEADER, table_rows

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in TABLE_HEADER:
        table.add_column(column, overflow="fold")
    for row in table_rows(result):
        table.add_row(*row)
    out = console()
    out.print(table)
    data = result.to_dict()
    out.print(f"{result.cluster}: {data['reachable']} of {len(data['nodes'])} node(s) "
              "reachable" + (f"; drift from {data['drift_run_dir']}"
                             if data["drift_run_dir"] else ""), soft_wrap=True)


# ---------------------------------------------------------------------------- runs

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def runs_table(runs, root: Path) -> None:
    """One line per run, newest first, in aligned columns (plain text: easy to grep)."""
    out = console()
    if not runs:
        out.print(f"no runs in {root}", soft_wrap=True)
        return
    rows = [("STARTED", "DURATION", "COMMAND", "CLUSTER", "RESULT", "RUN")]
    rows += [(r.started, _duration(r.duration_s), r.command, r.cluster or "-", r.result, r.name)
             for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.rjust(w) if i == 1 else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=False))]
        out.print("  ".join([*cells, row[-1]]), soft_wrap=True)


def run_detail(run, problems: list[tuple[str, str]], paths: list[Path]) -> None:
    """One run: what, where and how it ended; its recap; what failed; its files."""
    out = console()
    where = f" on {run.cluster}" if run.cluster else ""
    out.print(f"{run.name}: {run.command}{where}, started {run.started}, "
              f"took {_duration(run.duration_s)}: {run.result}", soft_wrap=True)
    recap = run.record.get("recap")
    if isinstance(recap, dict) and recap:
        from dsk_provision.runner import PlaybookResult, render_recap

        render_recap(PlaybookResult(run_dir=run.path, rc=int(run.record.get("rc") or 0),
                                    recap=recap, elapsed_s=float(run.duration_s or 0)),
                     out, per_host=True, run_dir_line=False)
    if problems:
        out.print(f"failures ({len(problems)}):")
        for host, message in problems:
            out.print(f"  {host}: {message}", soft_wrap=True)
    out.print("files:")
    for path in paths:
        out.print(f"  {path}{'/' if path.is_dir() else ''}", soft_wrap=True)


# ---------------------------------------------------------------------------- jobs

def _fmt_seconds(value) -> str:
    if value is None:
        return "-"
    value = max(0, int(value))
    h, rest = divmod(value, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _trainer_cells(trainer: dict | None) -> dict[str, str]:
    t = trainer or {}
    mfu = t.get("mfu")
    return {
        "step": f"{t['step']}/{t['steps']}" if "step" in t and "steps" in t else "-",
        "loss": f"{t['loss']:.4f}" if isinstance(t.get("loss"), (int, float)) else "-",
        "tokens/s": f"{t['tokens_per_s']:,.0f}" if t.get("tokens_per_s") else "-",
        "mfu": f"{100 * mfu:.1f}%" if isinstance(mfu, (int, float)) else "-",
        "eta": _fmt_seconds(t.get("eta_s")),
        "restarts": str(t.get("restarts", "-")),
    }


def jobs_list(jobs, silent: list[str]) -> None:
    from rich.table import Table

    out = console()
    if not jobs:
        out.print("no jobs")
    else:
        table = Table(box=None, header_style="bold")
        for col in ("job", "state", "step", "loss", "last checkpoint", "nodes"):
            table.add_column(col)
        for job in jobs:
            cells = _trainer_cells(job.trainer)
            ckpt = job.checkpoint["step"] if job.checkpoint else "-"
            table.add_row(job.name, job.state, cells["step"], cells["loss"], str(ckpt),
                          ", ".join(v.node for v in job.nodes if v.exists))
        out.print(table)
    if silent:
        console(stderr=True).print(f"warning: {', '.join(silent)} did not answer")


def job_status(status) -> None:
    from rich.table import Table

    out = console()
    cells = _trainer_cells(status.trainer)
    ckpt = status.checkpoint
    out.print(f"job {status.name}: {status.state}"
              + (f" ({status.culprit})" if status.culprit else ""))
    reason = next((v.reason for v in status.nodes if v.reason), None)
    if reason and status.state == "failed":
        out.print(f"  {reason}", markup=False, highlight=False, soft_wrap=True)
        if status.culprit_node and any(v.lost_node for v in status.nodes):
            out.print(f"  take {status.culprit_node} out of service and train again with "
                      f"the same --name: dsk-provision nodes cordon -i INVENTORY "
                      f"{status.culprit_node} --reason ... (or replace it: dsk-provision "
                      f"nodes replace)", markup=False, highlight=False, soft_wrap=True)
    if getattr(status, "slurm", None):
        facts = status.slurm
        reason = facts["reason"] if facts["reason"] not in ("", "None") else ""
        out.print(f"  Slurm job {facts['job_id']}: {facts['state']}"
                  + (f" ({reason})" if reason else "")
                  + (f", exit code {facts['exit_code']}" if facts["exit_code"] else "")
                  + (f", on {', '.join(facts['nodes'])}" if facts["nodes"] else "")
                  + f"; run directory {facts['run_dir']}", markup=False, highlight=False)
    out.print(f"  step {cells['step']} | loss {cells['loss']} | tokens/s {cells['tokens/s']}"
              f" | mfu {cells['mfu']} | eta {cells['eta']} | restarts {cells['restarts']}")
    out.print("  last checkpoint: " + (f"step {ckpt['step']} ({ckpt['path']})" if ckpt
                                       else "none"))
    table = Table(box=None, header_style="bold")
    for col in ("node", "state", "processes", "exit code", "note"):
        table.add_column(col)
    for v in status.nodes:
        if not v.reachable:
            table.add_row(v.node, "unreachable", "-", "-", v.error or "")
            continue
        if not v.exists:
            table.add_row(v.node, "-", "-", "-", "no job directory")
            continue
        state = "running" if v.running else (v.state or "-")
        if v.state == "running" and not v.running:
            state = "died"
        table.add_row(v.node, state, str(v.processes),
                      "-" if v.exit_code is None else str(v.exit_code),
                      "stop requested" if v.stop_requested else (
                          f"lost {v.lost_node}" if v.lost_node else ""))
    out.print(table)


def job_stopped(result) -> None:
    out = console()
    if not result.stopped:
        out.print(f"job {result.name}: nothing was running")
    else:
        how = "; ".join(f"{n}: SIG{e}" for n, e in sorted(result.escalated.items()))
        out.print(f"job {result.name}: stopped on {', '.join(result.stopped)}"
                  + (f" (escalated to {how})" if how else ""))
    ckpt = result.checkpoint
    out.print("  last checkpoint: " + (f"step {ckpt['step']} ({ckpt['path']})" if ckpt
                                       else "none"))
    for node in result.unreachable:
        console(stderr=True).print(f"warning: {node} did not answer: the job may still run "
                                   "there")
