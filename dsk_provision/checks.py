"""Validation checks: small functions of a node's facts (or the benchmark) and thresholds.

Facts come from the health_check role, one JSON per node at ``<run_dir>/facts/<host>.json``.
Thresholds come from a hardware profile (``dsk_provision/profiles/<name>.yml``), overridden
by the inventory's ``dsk_thresholds`` mapping, overridden by the caller. Every check
returns a :class:`CheckResult` that names the node; what cannot be judged is a ``skip``
with the reason, never a silent pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from dsk_provision.errors import InputError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
PASS, FAIL, SKIP = "pass", "fail", "skip"
CLUSTER = "cluster"  # the node name of results that belong to all nodes together

# Every threshold a profile may set, with its type and meaning.
THRESHOLDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "require_cuda": (bool, "torch must see CUDA on every node"),
    "require_time_sync": (bool, "clocks must be synchronised (NTP/chrony)"),
    "min_disk_free_gb": (dict, "free space per mount point, GB"),
    "min_mem_available_mb": ((int, float), "available memory per node, MB"),
    "allreduce_min_busbw_gbs": ((int, float),
                                "all-reduce busbw at the largest size, more than one node, GB/s"),
    "allreduce_min_busbw_gbs_single_node": ((int, float),
                                            "all-reduce busbw at the largest size, one node, GB/s"),
    "allreduce_max_wrong": (int, "wrong elements allowed in the all-reduce check"),
}


@dataclass
class CheckResult:
    node: str
    check: str
    status: str  # pass | fail | skip
    value: Any
    threshold: Any
    message: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- thresholds


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yml"))


def read_profile(name: str, *, file: str | None = None,
                 field: str = "all.vars.dsk_profile") -> dict[str, Any]:
    """A hardware profile (description, benchmark settings, thresholds), checked.

    An unknown name is an InputError naming ``field`` in ``file`` (the inventory).
    """
    path = PROFILES_DIR / f"{name}.yml"
    if not path.is_file():
        raise InputError(f"unknown hardware profile {name!r}", file=file, field=field,
                         hint=f"choose one of: {', '.join(profile_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    _check_thresholds(data.get("thresholds") or {}, file=str(path), prefix="thresholds")
    return {"name": name, "description": data.get("description", ""),
            "benchmark": dict(data.get("benchmark") or {}),
            "thresholds": dict(data.get("thresholds") or {})}


def load_profile(name: str, *, file: str | None = None,
                 field: str = "all.vars.dsk_profile") -> dict[str, Any]:
    """The thresholds of a hardware profile."""
    return read_profile(name, file=file, field=field)["thresholds"]


def profile_name(inventory) -> str:
    """The inventory's dsk_profile; cpu-sandbox for an inventory without GPUs."""
    name = inventory.vars.get("dsk_profile")
    if name:
        return str(name)
    if any(n.gpus for n in inventory.nodes):
        raise InputError("GPU nodes need a hardware profile for their thresholds",
                         file=str(inventory.path) if getattr(inventory, "path", None) else None,
                         field="all.vars.dsk_profile",
                         hint=f"set dsk_profile to one of: {', '.join(profile_names())}")
    return "cpu-sandbox"


def _check_thresholds(values: Any, *, file: str | None, prefix: str) -> None:
    if not isinstance(values, dict):
        raise InputError("must be a mapping of threshold names to values", file=file,
                         field=prefix)
    for key, value in values.items():
        where = f"{prefix}.{key}"
        if key not in THRESHOLDS:
            raise InputError(f"unknown threshold {key!r}", file=file, field=where,
                             hint=f"known: {', '.join(sorted(THRESHOLDS))}")
        kind, _ = THRESHOLDS[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is bool:
            ok = isinstance(value, bool)
        if not ok:
            raise InputError(f"{value!r} is not a valid value ({THRESHOLDS[key][1]})",
                             file=file, field=where)
        if key == "min_disk_free_gb":
            for mount, gb in value.items():
                if isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb < 0:
                    raise InputError(f"{gb!r} is not a number of GB", file=file,
                                     field=f"{where}.{mount}")
        elif kind is not bool and value < 0:
            raise InputError(f"{value!r} must not be negative", file=file, field=where)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def resolve_thresholds(inventory, overrides: dict | None = None) -> tuple[str, dict[str, Any]]:
    """(profile name, thresholds): profile, then inventory dsk_thresholds, then overrides."""
    file = str(inventory.path) if getattr(inventory, "path", None) else None
    name = profile_name(inventory)
    thresholds = load_profile(name, file=file)
    from_inventory = inventory.vars.get("dsk_thresholds") or {}
    _check_thresholds(from_inventory, file=file, prefix="all.vars.dsk_thresholds")
    thresholds = _merge(thresholds, from_inventory)
    if overrides:
        _check_thresholds(overrides, file=None, prefix="thresholds")
        thresholds = _merge(thresholds, overrides)
    return str(name), thresholds


# --------------------------------------------------------------------------- node checks


def _result(facts: dict, check: str, status: str, value, threshold, message: str) -> CheckResult:
    return CheckResult(str(facts.get("host", "?")), check, status, value, threshold, message)


def check_gpu_count(facts: dict, thresholds: dict) -> CheckResult:
    gpus = facts.get("gpus") or {}
    declared, detected = gpus.get("declared"), gpus.get("detected")
    if declared is None or detected is None:
        return _result(facts, "gpu_count", FAIL, detected, declared, "GPU count not reported")
    if detected == declared:
        models = ", ".join(sorted(set(gpus.get("models") or []))) or "no GPUs"
        return _result(facts, "gpu_count", PASS, detected, declared,
                       f"{detected} GPU(s) as declared ({models})")
    return _result(facts, "gpu_count", FAIL, detected, declared,
                   f"{detected} GPU(s) detected, {declared} declared")


def check_python_env(facts: dict, thresholds: dict) -> CheckResult:
    py = facts.get("python") or {}
    declared = (facts.get("gpus") or {}).get("declared") or 0
    need_cuda = bool(thresholds.get("require_cuda")) or declared > 0
    wanted = "torch + CUDA" if need_cuda else "torch"
    torch_version = py.get("torch")
    where = py.get("path") or "the trainer python"
    if not torch_version:
        reason = (facts.get("skipped") or {}).get("python")
        return _result(facts, "python_env", FAIL, None, wanted,
                       f"torch is not importable with {where}" + (f" ({reason})" if reason else ""))
    if need_cuda and not py.get("cuda_available"):
        return _result(facts, "python_env", FAIL, f"torch {torch_version}, no CUDA", wanted,
                       f"torch {torch_version} at {where} does not see CUDA")
    cuda = ", CUDA" if py.get("cuda_available") else ""
    return _result(facts, "python_env", PASS, f"torch {torch_version}{cuda}", wanted,
                   f"python {py.get('version', '?')} at {where}")


def check_disk_free(facts: dict, thresholds: dict) -> CheckResult:
    want = thresholds.get("min_disk_free_gb") or {}
    have = facts.get("disk_free_gb") or {}
    low, unknown = [], []
    for mount, minimum in sorted(want.items()):
        value = have.get(mount)
        if value is None:
            unknown.append(mount)
        elif value < minimum:
            low.append(f"{mount}: {value:g} GB free < {minimum:g} GB")
    value = {m: have.get(m) for m in sorted(want)}
    if low:
        return _result(facts, "disk_free", FAIL, value, want, "; ".join(low))
    if unknown and len(unknown) == len(want):
        reason = (facts.get("skipped") or {}).get("disk_free_gb")
        return _result(facts, "disk_free", SKIP, value, want,
                       f"free space not reported for {', '.join(unknown)}"
                       + (f" ({reason})" if reason else ""))
    note = f" (not reported: {', '.join(unknown)})" if unknown else ""
    return _result(facts, "disk_free", PASS, value, want, "enough free space" + note)


def check_mem_available(facts: dict, thresholds: dict) -> CheckResult:
    minimum = thresholds.get("min_mem_available_mb", 0)
    value = facts.get("mem_available_mb")
    if value is None:
        return _result(facts, "mem_available", FAIL, None, minimum, "available memory not reported")
    if value < minimum:
        return _result(facts, "mem_available", FAIL, value, minimum,
                       f"{value} MB available < {minimum} MB")
    return _result(facts, "mem_available", PASS, value, minimum,
                   f"{value} MB of {facts.get('mem_total_mb', '?')} MB available")


def check_ssh_peers(facts: dict, thresholds: dict) -> CheckResult:
    peers = facts.get("ssh_peers")
    if peers is None:
        return _result(facts, "ssh_peers", FAIL, None, "all", "SSH to peers not reported")
    bad = sorted(p for p, ok in peers.items() if not ok)
    value = f"{len(peers) - len(bad)}/{len(peers)}"
    if bad:
        return _result(facts, "ssh_peers", FAIL, value, "all",
                       f"cannot reach by SSH: {', '.join(bad)}")
    return _result(facts, "ssh_peers", PASS, value, "all",
                   "reaches every peer by SSH" if peers else "no peers")


def check_time_synced(facts: dict, thresholds: dict) -> CheckResult:
    synced = facts.get("time_synced")
    if synced is None:
        return _result(facts, "time_synced", SKIP, None, True,
                       "unknown: no time synchronisation status on this node")
    if synced:
        return _result(facts, "time_synced", PASS, True, True, "clock synchronised")
    if not thresholds.get("require_time_sync", True):
        return _result(facts, "time_synced", SKIP, False, False,
                       "clock not synchronised, but the profile does not require it")
    return _result(facts, "time_synced", FAIL, False, True, "clock not synchronised")


NODE_CHECKS: dict[str, Callable[[dict, dict], CheckResult]] = {
    "gpu_count": check_gpu_count,
    "python_env": check_python_env,
    "disk_free": check_disk_free,
    "mem_available": check_mem_available,
    "ssh_peers": check_ssh_peers,
    "time_synced": check_time_synced,
}


# Checks whose facts the health_check role may leave unknown (listed under "skipped");
# for the others an unknown fact is a failure, and the role's reason goes into the message.
SKIPPABLE = ("time_synced", "ssh_peers")


def run_node_checks(node: str, facts: dict | None, thresholds: dict) -> list[CheckResult]:
    """Every node check for one node; a check the role skipped is a skip with its reason."""
    if facts is None:
        return [CheckResult(node, "facts", FAIL, None, None,
                            "no facts from this node (health_check did not report)")]
    facts = {**facts, "host": facts.get("host") or node}
    skipped = facts.get("skipped") or {}
    out = []
    for name, check in NODE_CHECKS.items():
        if name in SKIPPABLE and name in skipped:
            out.append(CheckResult(node, name, SKIP, None, None, str(skipped[name])))
        else:
            out.append(check(facts, thresholds))
    return out


# --------------------------------------------------------------------------- benchmark checks


def _largest(bench: dict) -> dict | None:
    rows = bench.get("results") or []
    return max(rows, key=lambda r: r["size"]) if rows else None


def check_allreduce_correct(bench: dict, thresholds: dict) -> CheckResult:
    allowed = int(thresholds.get("allreduce_max_wrong", 0))
    wrong = int(bench.get("wrong_total", 0))
    if not bench.get("results"):
        return CheckResult(CLUSTER, "allreduce_correct", FAIL, None, allowed,
                           "the benchmark reported no sizes")
    if wrong > allowed:
        bad = [f"{r['size']} B {mode.replace('_', '-')}" for r in bench["results"]
               for mode in ("out_of_place", "in_place") if r[mode]["wrong"]]
        return CheckResult(CLUSTER, "allreduce_correct", FAIL, wrong, allowed,
                           f"{wrong} wrong element(s) at {', '.join(bad)}")
    return CheckResult(CLUSTER, "allreduce_correct", PASS, wrong, allowed,
                       f"sums correct at {len(bench['results'])} sizes")


def busbw_threshold(thresholds: dict, nodes: int) -> float | None:
    if nodes == 1 and "allreduce_min_busbw_gbs_single_node" in thresholds:
        return float(thresholds["allreduce_min_busbw_gbs_single_node"])
    value = thresholds.get("allreduce_min_busbw_gbs")
    return None if value is None else float(value)


def check_allreduce_busbw(bench: dict, thresholds: dict, nodes: int) -> CheckResult:
    """busbw at the largest size (the better of out-of-place and in-place) >= threshold."""
    minimum = busbw_threshold(thresholds, nodes)
    row = _largest(bench)
    if row is None:
        return CheckResult(CLUSTER, "allreduce_busbw", FAIL, None, minimum,
                           "the benchmark reported no sizes")
    if int(bench.get("world_size", 0)) < 2:
        return CheckResult(CLUSTER, "allreduce_busbw", SKIP, 0.0, minimum,
                           "one rank: an all-reduce moves nothing over a bus")
    busbw = max(row["out_of_place"]["busbw_gbs"], row["in_place"]["busbw_gbs"])
    value = round(busbw, 3) if math.isfinite(busbw) else busbw
    if minimum is None:
        return CheckResult(CLUSTER, "allreduce_busbw", SKIP, value, None,
                           "no busbw threshold in the profile")
    where = f"{row['size']} B, {bench.get('world_size')} ranks on {nodes} node(s)"
    if busbw < minimum:
        return CheckResult(CLUSTER, "allreduce_busbw", FAIL, value, minimum,
                           f"busbw {busbw:.3f} GB/s < {minimum:g} GB/s ({where})")
    return CheckResult(CLUSTER, "allreduce_busbw", PASS, value, minimum,
                       f"busbw {busbw:.3f} GB/s ({where})")


def run_benchmark_checks(bench: dict | None, thresholds: dict, nodes: int,
                         error: str | None = None) -> list[CheckResult]:
    if bench is None:
        message = error or "the all-reduce benchmark produced no result"
        return [CheckResult(CLUSTER, "allreduce_run", FAIL, None, None, message)]
    return [check_allreduce_correct(bench, thresholds),
            check_allreduce_busbw(bench, thresholds, nodes)]
