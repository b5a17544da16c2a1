"""Benchmark checks: the all-reduce (correct sums, busbw at the largest size) and the
per-device compute benchmark (matmul, memory copy), against the thresholds."""

from __future__ import annotations

import math

from dsk_provision.validation.results import CLUSTER, FAIL, PASS, SKIP, CheckResult


def largest_row(bench: dict) -> dict | None:
    """The result row of the largest message size, or None when there is none."""
    rows = bench.get("results") or []
    return max(rows, key=lambda r: r["size"]) if rows else None


def row_busbw(row: dict) -> float:
    """A row's busbw: the better of out-of-place and in-place, GB/s."""
    return max(row["out_of_place"]["busbw_gbs"], row["in_place"]["busbw_gbs"])


def check_allreduce_correct(bench: dict, thresholds: dict, *, node: str = CLUSTER,
                            check: str = "allreduce_correct") -> CheckResult:
    allowed = int(thresholds.get("allreduce_max_wrong", 0))
    wrong = int(bench.get("wrong_total", 0))
    if not bench.get("results"):
        return CheckResult(node, check, FAIL, None, allowed,
                           "the benchmark reported no sizes")
    if wrong > allowed:
        bad = [f"{r['size']} B {mode.replace('_', '-')}" for r in bench["results"]
               for mode in ("out_of_place", "in_place") if r[mode]["wrong"]]
        return CheckResult(node, check, FAIL, wrong, allowed,
                           f"{wrong} wrong element(s) at {', '.join(bad)}")
    return CheckResult(node, check, PASS, wrong, allowed,
                       f"sums correct at {len(bench['results'])} sizes")


def busbw_threshold(thresholds: dict, nodes: int) -> float | None:
    if nodes == 1 and "allreduce_min_busbw_gbs_single_node" in thresholds:
        return float(thresholds["allreduce_min_busbw_gbs_single_node"])
    value = thresholds.get("allreduce_min_busbw_gbs")
    return None if value is None else float(value)


def check_allreduce_busbw(bench: dict, thresholds: dict, nodes: int, *,
                          node: str = CLUSTER, check: str = "allreduce_busbw") -> CheckResult:
    """busbw at the largest size (the better of out-of-place and in-place) >= threshold."""
    minimum = busbw_threshold(thresholds, nodes)
    row = largest_row(bench)
    if row is None:
        return CheckResult(node, check, FAIL, None, minimum,
                           "the benchmark reported no sizes")
    if int(bench.get("world_size") or 0) < 2:
        return CheckResult(node, check, SKIP, 0.0, minimum,
                           "one rank: an all-reduce moves nothing over a bus")
    busbw = row_busbw(row)
    value = round(busbw, 3) if math.isfinite(busbw) else busbw
    if minimum is None:
        return CheckResult(node, check, SKIP, value, None,
                           "no busbw threshold in the profile")
    where = f"{row['size']} B, {bench.get('world_size')} ranks on {nodes} node(s)"
    if busbw < minimum:
        return CheckResult(node, check, FAIL, value, minimum,
                           f"busbw {busbw:.3f} GB/s < {minimum:g} GB/s ({where})")
    return CheckResult(node, check, PASS, value, minimum,
                       f"busbw {busbw:.3f} GB/s ({where})")


def run_benchmark_checks(bench: dict | None, thresholds: dict, nodes: int,
                         error: str | None = None) -> list[CheckResult]:
    if bench is None:
        message = error or "the all-reduce benchmark produced no result"
        return [CheckResult(CLUSTER, "allreduce_run", FAIL, None, None, message)]
    return [check_allreduce_correct(bench, thresholds),
            check_allreduce_busbw(bench, thresholds, nodes)]


def run_perf_checks(node: str, perf: dict | None, thresholds: dict,
                    error: str | None = None) -> list[CheckResult]:
    """matmul TFLOP/s and memory copy GB/s of the compute probe, per device, on one node.

    The slowest device is the node's value: one slow GPU holds back every collective.
    """
    specs = (("matmul_tflops", "matmul_min_tflops", "TFLOP/s", "{dtype} matmul"),
             ("copy_gbs", "copy_min_gbs", "GB/s", "memory copy (read + write)"))
    out = []
    for key, limit, unit, what in specs:
        check = "matmul_tflops" if key == "matmul_tflops" else "copy_bandwidth"
        minimum = thresholds.get(limit)
        if perf is None:
            out.append(CheckResult(node, check, FAIL, None, minimum,
                                   error or "the compute benchmark produced no result"))
            continue
        devices = perf.get("devices") or []
        if not devices:
            out.append(CheckResult(node, check, FAIL, None, minimum, "no device measured"))
            continue
        what = what.format(dtype=perf["matmul"]["dtype"])  # as the probe measured it
        worst = min(devices, key=lambda d: d[key])
        value = round(float(worst[key]), 3)
        kind = perf.get("device", "?")
        where = worst.get("name", kind)
        if kind != "cpu":  # a node has one CPU device, and many GPUs
            where = f"{where} {worst.get('index', '')}".strip()
        if minimum is None:
            out.append(CheckResult(node, check, SKIP, value, None,
                                   f"no {limit} threshold in the profile"))
        elif worst[key] < minimum:
            out.append(CheckResult(node, check, FAIL, value, minimum,
                                   f"{what} {worst[key]:.3f} {unit} < {minimum:g} {unit} "
                                   f"on {where}"))
        else:
            out.append(CheckResult(node, check, PASS, value, minimum,
                                   f"{what}: slowest of {len(devices)} {kind} device(s) "
                                   f"{worst[key]:.3f} {unit}"))
    return out


def nccl_tests_checks(outcomes: dict[str, tuple[str, dict | str]], thresholds: dict
                      ) -> list[CheckResult]:
    """One check per node from all_reduce_perf's outcome (see probes.run_nccl_tests):
    its sums judged like ours, its busbw shown beside ours rather than judged."""
    out = []
    for name, (kind, value) in outcomes.items():
        if kind != "ok":
            out.append(CheckResult(name, "nccl_tests", SKIP if kind == "skip" else FAIL, None,
                                   None, value))
            continue
        result = check_allreduce_correct(value, thresholds, node=name, check="nccl_tests")
        row = largest_row(value)
        if result.status == PASS and row:
            busbw = row_busbw(row)
            result.value = round(busbw, 3)
            result.threshold = None
            result.message = (f"all_reduce_perf busbw {busbw:.3f} GB/s at {row['size']} B "
                              f"({value.get('world_size')} GPUs), shown beside ours")
        out.append(result)
    return out
