"""Validation reports: ``report.json`` (machines) and ``report.md`` (people).

The Markdown holds the checks per node, the compute benchmark per node, the all-reduce
across nodes, within each node beside nccl-tests' all_reduce_perf where it ran, the
isolation of a slow node, and links the busbw plot (PNG, drawn by ``plots.py``).

Both are rendered from one plain dict (``ValidationReport.to_dict()``) and written whole:
into a temporary file beside the target, then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsk_provision.files import write_private

STATUS_MARK = {"pass": "PASS", "fail": "FAIL", "skip": "skip"}


def write_whole(path: Path, text: str) -> Path:
    """Write text to path atomically (temp file in the same directory + rename), private
    (0600) as everything in a run directory."""
    return write_private(Path(path), text)


def write_json(report: dict[str, Any], path: Path) -> Path:
    return write_whole(path, json.dumps(report, indent=2, default=str) + "\n")


def format_value(value: Any) -> str:
    """A check's value or threshold in one short cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _summary(report: dict[str, Any]) -> list[str]:
    counts = report.get("summary") or {}
    verdict = "PASSED" if report.get("passed") else "FAILED"
    lines = [
        f"# Validation report: {report.get('cluster', 'cluster')}",
        "",
        f"**{verdict}**: {counts.get('pass', 0)} passed, {counts.get('fail', 0)} failed, "
        f"{counts.get('skip', 0)} skipped.",
        "",
        f"- Profile: `{report.get('profile')}`",
        f"- Nodes: {', '.join(report.get('nodes') or []) or '-'}",
        f"- Started: {report.get('started', '-')}, took {report.get('elapsed_s', 0):.1f} s",
        f"- Run directory: `{report.get('run_dir')}`",
    ]
    failures = [c for c in report.get("checks") or [] if c["status"] == "fail"]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- **{c['node']}** `{c['check']}`: {c['message']}" for c in failures]
    return lines


def _checks(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Checks per node"]
    by_node: dict[str, list[dict]] = {}
    for check in report.get("checks") or []:
        by_node.setdefault(check["node"], []).append(check)
    order = list(report.get("nodes") or []) + sorted(n for n in by_node
                                                     if n not in (report.get("nodes") or []))
    for node in order:
        if node not in by_node:
            continue
        lines += ["", f"### {node}", ""]
        lines += _table(["check", "result", "value", "threshold", "detail"],
                        [[c["check"], STATUS_MARK.get(c["status"], c["status"]),
                          format_value(c["value"]), format_value(c["threshold"]), c["message"]]
                         for c in by_node[node]])
    return lines


def _allreduce(report: dict[str, Any]) -> list[str]:
    bench = report.get("allreduce")
    lines = ["", "## All-reduce across nodes", ""]
    if not bench:
        return lines + ["The benchmark produced no result (see the failures above)."]
    nccl = f", NCCL {bench['nccl']}" if bench.get("nccl") else ""
    api = f" through {bench['api']}" if bench.get("api") else ""
    note = f" ({bench['api_note']})" if bench.get("api_note") else ""
    lines += [
        f"{bench['world_size']} ranks, backend {bench['backend']}{api}{note}{nccl}, torch "
        f"{bench.get('torch', '?')}, {bench['warmup']} warm-up + {bench['iters']} timed "
        f"iterations per size. busbw = algbw x 2(n-1)/n = algbw x "
        f"{bench.get('busbw_factor', 0):.3f}; times in microseconds, bandwidths in GB/s.",
        "",
    ]
    rows = []
    for row in bench.get("results") or []:
        cells = [row["size"], row["count"], row["type"]]
        for mode in ("out_of_place", "in_place"):
            m = row[mode]
            cells += [f"{m['time_us']:.1f}", f"{m['algbw_gbs']:.3f}", f"{m['busbw_gbs']:.3f}",
                      m["wrong"]]
        rows.append(cells)
    lines += _table(["size (B)", "count", "type",
                     "out-of-place time", "algbw", "busbw", "#wrong",
                     "in-place time", "algbw", "busbw", "#wrong"],
                    rows, align="rrl" + "rrrr" * 2)
    lines += ["", f"Wrong elements in total: {bench.get('wrong_total', 0)}; average busbw "
                  f"{bench.get('avg_busbw_gbs', 0):.3f} GB/s."]
    return lines


def _gpu_perf(report: dict[str, Any]) -> list[str]:
    perf = report.get("gpu_perf") or {}
    if not perf:
        return []
    lines = ["", "## Compute per device", ""]
    first = next(iter(perf.values()))
    lines += [f"{first['matmul']['dtype']} matmul {first['matmul']['size']}^3 and a copy of "
              f"{first['copy_bytes'] / (1 << 20):.0f} MiB (read + write counted), "
              f"{first['warmup']} warm-up + {first['iters']} timed calls.", ""]
    rows = [[node, f"{r['name']} {r['index']}", f"{r['matmul_tflops']:.2f}",
             f"{r['copy_gbs']:.1f}"] for node, result in perf.items() for r in result["devices"]]
    return lines + _table(["node", "device", "matmul TFLOP/s", "copy GB/s"], rows, align="llrr")


def busbw_by_size(result: dict, mode: str) -> dict[int, float]:
    """{size: busbw} of one mode of an all-reduce result (ours or parsed nccl-tests)."""
    return {r["size"]: r[mode]["busbw_gbs"] for r in result.get("results") or []}


def _side_by_side(report: dict[str, Any]) -> list[str]:
    intra = report.get("intra_node") or {}
    nccl = report.get("nccl_tests") or {}
    nodes = [n for n in report.get("nodes") or [] if n in intra or n in nccl]
    if not nodes:
        return []
    apis = sorted({intra[n]["api"] for n in nodes if n in intra and intra[n].get("api")})
    lines = ["", "## All-reduce within each node", "",
             "busbw in GB/s, out of place and in place: this tool's benchmark"
             + (f" ({', '.join(apis)})" if apis else "")
             + " beside nccl-tests' all_reduce_perf with the same sizes. Where both ran, "
             "the last column of a node is ours against nccl-tests, the lower of the two "
             "modes.", ""]
    header, columns, sizes = ["size (B)"], [], set()
    for node in nodes:
        for who, results in (("ours", intra.get(node)), ("nccl-tests", nccl.get(node))):
            if results is None:
                continue
            for mode, short in (("out_of_place", "out"), ("in_place", "in")):
                header.append(f"{node} {who} {short}")
                columns.append(busbw_by_size(results, mode))
        if node in intra and node in nccl:
            header.append(f"{node} ours/nccl-tests")
            columns.append(ratios_to(intra[node], nccl[node]))
    for col in columns:
        sizes |= set(col)
    ratio_columns = {i for i, name in enumerate(header[1:]) if name.endswith("ours/nccl-tests")}

    def cell(i: int, col: dict, size: int) -> str:
        if size not in col:
            return "-"
        return f"{col[size]:.0%}" if i in ratio_columns else f"{col[size]:.3f}"

    rows = [[size] + [cell(i, col, size) for i, col in enumerate(columns)]
            for size in sorted(sizes)]
    return lines + _table(header, rows, align="r" * len(header))


def ratios_to(ours: dict, theirs: dict) -> dict[int, float]:
    """Per size, our busbw over nccl-tests', the lower of out of place and in place."""
    out: dict[int, float] = {}
    for mode in ("out_of_place", "in_place"):
        other = busbw_by_size(theirs, mode)
        for size, mine in busbw_by_size(ours, mode).items():
            if other.get(size):
                out[size] = min(out.get(size, float("inf")), mine / other[size])
    return out


def _isolation(report: dict[str, Any]) -> list[str]:
    iso = report.get("isolation")
    if not iso:
        return []
    lines = ["", "## Isolation", "",
             "The cross-node all-reduce was too slow, so it ran again on pairs of nodes.", ""]
    rows = [[" + ".join(p["nodes"]), "-" if p["busbw_gbs"] is None else f"{p['busbw_gbs']:.4f}",
             "slow" if p["slow"] else "ok"] for p in iso.get("pairs") or []]
    lines += _table(["pair", "busbw GB/s", "verdict"], rows, align="lrl")
    named = [f"node **{n}**" for n in iso.get("slow_nodes") or []]
    named += [f"link **{a} - {b}**" for a, b in iso.get("slow_links") or []]
    lines += ["", "Culprit: " + (", ".join(named) if named else "none found among pairs") + "."]
    return lines


def _plots(report: dict[str, Any]) -> list[str]:
    return [line for name in report.get("plots") or [] for line in ("", f"![busbw]({name})")]


def render_markdown(report: dict[str, Any]) -> str:
    parts = (_summary(report) + _checks(report) + _gpu_perf(report) + _allreduce(report)
             + _side_by_side(report) + _isolation(report) + _plots(report))
    return "\n".join(parts) + "\n"


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    return write_whole(path, render_markdown(report))


def write_reports(report: dict[str, Any], run_dir: Path) -> tuple[Path, Path]:
    """report.json and report.md in the run directory."""
    run_dir = Path(run_dir)
    json_path = write_json(report, run_dir / "report.json")
    return json_path, write_markdown(report, run_dir / "report.md")
