"""Validation checks: small functions of a node's facts (or the benchmark) and thresholds.

Facts come from the health_check role, one JSON per node at ``<run_dir>/facts/<host>.json``.
Thresholds come from a hardware profile (``dsk_provision/profiles/<name>.yml``), overridden
by the inventory's ``dsk_thresholds`` mapping, overridden by the caller. Every check
returns a :class:`CheckResult` that names the node; what cannot be judged is a ``skip``
with the reason, never a silent pass.
"""

from __future__ import annotations

import math
import re
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
    "gpu_model": (str, "text every GPU's name must contain (case-insensitive)"),
    "require_persistence_mode": (bool, "nvidia-smi persistence mode must be Enabled"),
    "max_ecc_uncorrected": (int, "volatile uncorrected ECC errors allowed per GPU"),
    "max_xid_errors": (int, "NVIDIA XID events allowed in the kernel log since boot"),
    "throttle_reasons_allowed": (list, "clock event (throttle) reasons that are no problem"),
    "pcie_min_gen": (int, "lowest PCIe generation the GPU's link may support (max gen)"),
    "pcie_min_width": (int, "lowest PCIe link width (lanes) a GPU may run at"),
    "nvlink_min_links_up": (int, "NVLink links up per GPU"),
    "ib_min_ports_active": (int, "InfiniBand/RoCE ports in state ACTIVE per node"),
    "ib_min_rate_gbps": ((int, float), "rate of every active InfiniBand port, Gb/s"),
    "require_gpudirect": (bool, "nvidia_peermem loaded where GPUs and HCAs are present"),
    "matmul_min_tflops": ((int, float), "bf16 matmul per GPU (per CPU node without GPUs), TFLOP/s"),
    "copy_min_gbs": ((int, float), "device memory copy per GPU, read + write, GB/s"),
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
        if kind is list:
            if not all(isinstance(v, str) for v in value):
                raise InputError(f"{value!r} must be a list of names", file=file, field=where)
        elif kind is str:
            if not value.strip():
                raise InputError("must not be empty", file=file, field=where)
        elif key == "min_disk_free_gb":
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


# --------------------------------------------------------------------------- GPU node parsing
#
# The health_check role reports raw command outputs under facts["gpu_stack"]; these
# functions read them. Formats: nvidia-smi --query-gpu ... --format=csv,noheader,nounits
# (one line per GPU, fields in the order the role asked for, "[N/A]"/"[Not Supported]"
# for unknown), nvidia-smi --query-remapped-rows, nvidia-smi nvlink -s, the kernel log's
# "NVRM: Xid (PCI:<bus>): <code>, ..." lines, /sys/class/infiniband/<hca>/ports/<n>/{state,
# rate}, /etc/nccl.conf (KEY=VALUE lines) and the table of `dcgmi diag -r <level>`.

# Bits of clocks_event_reasons.active (nvml.h, nvmlClocksEventReason*).
CLOCK_REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
_UNKNOWN = ("[n/a]", "[not supported]", "n/a", "[unknown error]", "")
_XID_RE = re.compile(r"Xid \(PCI:([0-9A-Fa-f:.]+)\):\s*(\d+)")
_NVLINK_GPU_RE = re.compile(r"^GPU (\d+):")
_NVLINK_LINK_RE = re.compile(r"^\s*Link (\d+):\s*(.+?)\s*$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*Gb/sec")


def _field(value: str) -> str | None:
    value = value.strip()
    return None if value.lower() in _UNKNOWN else value


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        return None


def parse_gpu_query(text: str | None, fields: str | None) -> list[dict[str, Any]]:
    """One dict per GPU, keyed by the query's field names (…reasons.active -> "reasons")."""
    if not text or not fields:
        return []
    names = [f.strip() for f in fields.split(",")]
    names = ["reasons" if n.endswith("reasons.active") else n for n in names]
    gpus = []
    for line in text.strip().splitlines():
        values = [_field(v) for v in line.split(",")]
        if len(values) != len(names):
            continue
        gpus.append(dict(zip(names, values, strict=True)))
    return gpus


def clock_reasons(mask: str | None) -> list[str] | None:
    value = _int(mask)
    if value is None:
        return None
    names = [name for bit, name in CLOCK_REASON_BITS.items() if value & bit]
    unknown = value & ~sum(CLOCK_REASON_BITS)
    return names + ([f"unknown_0x{unknown:x}"] if unknown else [])


def parse_remapped_rows(text: str | None) -> dict[str, dict[str, int | None]]:
    """{bus id: {"pending": n, "failure": n}} (Yes/No count as 1/0)."""
    out = {}
    for line in (text or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue

        def number(v: str) -> int | None:
            low = v.lower()
            return 1 if low == "yes" else 0 if low == "no" else _int(_field(v))

        out[parts[0]] = {"pending": number(parts[1]), "failure": number(parts[2])}
    return out


def parse_nvlink(text: str | None) -> dict[int, dict[str, Any]]:
    """{GPU index: {"up": n, "down": n, "gbs": [per active link]}} from nvidia-smi nvlink -s."""
    out: dict[int, dict[str, Any]] = {}
    current = None
    for line in (text or "").splitlines():
        gpu = _NVLINK_GPU_RE.match(line)
        if gpu:
            current = out.setdefault(int(gpu.group(1)), {"up": 0, "down": 0, "gbs": []})
            continue
        link = _NVLINK_LINK_RE.match(line)
        if link and current is not None:
            speed = re.match(r"(\d+(?:\.\d+)?)\s*GB/s", link.group(2))
            if speed:
                current["up"] += 1
                current["gbs"].append(float(speed.group(1)))
            else:
                current["down"] += 1
    return out


def parse_xid(lines: list[str] | None) -> list[dict[str, Any]]:
    out = []
    for line in lines or []:
        match = _XID_RE.search(line)
        if match:
            out.append({"pci": match.group(1), "xid": int(match.group(2)), "line": line})
    return out


def parse_ib_rate(text: str | None) -> float | None:
    match = _RATE_RE.match(text or "")
    return float(match.group(1)) if match else None


def parse_ib_state(text: str | None) -> str | None:
    """'4: ACTIVE' -> 'ACTIVE'."""
    if not text:
        return None
    return text.split(":", 1)[-1].strip().upper()


def parse_nccl_conf(text: str | None) -> dict[str, str]:
    out = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


def parse_dcgm_diag(text: str | None) -> dict[str, str]:
    """{test: "Pass" | "Fail" | "Warn" | "Skip" ...} from the table of dcgmi diag."""
    out = {}
    for line in (text or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0] or cells[0].startswith(("-", "=")):
            continue
        verdict = cells[1].split(" ", 1)[0].capitalize()
        if verdict in ("Pass", "Fail", "Warn", "Skip"):
            out[cells[0]] = cells[1]
    return out


# --------------------------------------------------------------------------- GPU node checks


def _stack(facts: dict) -> dict:
    return facts.get("gpu_stack") or {}


def _pins(facts: dict) -> dict:
    return facts.get("pins") or {}


def _why(facts: dict, *keys: str) -> str:
    skipped = facts.get("skipped") or {}
    reasons = [str(skipped[k]) for k in keys if k in skipped]
    return "; ".join(reasons)


def _no_gpu(facts: dict, check: str, threshold=None) -> CheckResult | None:
    """A skip for a node without GPUs (none declared, none detected), else None."""
    gpus = facts.get("gpus") or {}
    if not gpus.get("declared") and not gpus.get("detected"):
        return _result(facts, check, SKIP, None, threshold, "no GPU on this node")
    return None


def _gpus(facts: dict, check: str, threshold) -> tuple[list[dict] | None, CheckResult | None]:
    """The parsed nvidia-smi rows, or the skip/fail that stands in for the check."""
    skip = _no_gpu(facts, check, threshold)
    if skip:
        return None, skip
    smi = _stack(facts).get("nvidia_smi") or {}
    rows = parse_gpu_query(smi.get("query"), smi.get("query_fields"))
    if not rows:
        reason = _why(facts, "nvidia_smi") or "nvidia-smi reported no GPUs"
        return None, _result(facts, check, FAIL, None, threshold, reason)
    return rows, None


def check_gpu_model(facts: dict, thresholds: dict) -> CheckResult:
    want = thresholds.get("gpu_model")
    skip = _no_gpu(facts, "gpu_model", want)
    if skip:
        return skip
    models = list((facts.get("gpus") or {}).get("models") or [])
    if not want:
        return _result(facts, "gpu_model", SKIP, ", ".join(sorted(set(models))) or None, None,
                       "the profile names no GPU model")
    wrong = sorted({m for m in models if want.lower() not in m.lower()})
    value = ", ".join(sorted(set(models))) or None
    if not models or wrong:
        return _result(facts, "gpu_model", FAIL, value, want,
                       f"GPU model {', '.join(wrong) or 'unknown'} is not {want}")
    return _result(facts, "gpu_model", PASS, value, want, f"{len(models)} x {models[0]}")


def check_driver_version(facts: dict, thresholds: dict) -> CheckResult:
    pins = _pins(facts)
    branch, exact = pins.get("nvidia_driver_branch"), pins.get("nvidia_driver_version")
    want = str(exact or (f"{branch}.*" if branch else "")) or None
    skip = _no_gpu(facts, "driver_version", want)
    if skip:
        return skip
    have = facts.get("nvidia_driver")
    if not have:
        return _result(facts, "driver_version", FAIL, None, want,
                       _why(facts, "nvidia_driver") or "no NVIDIA driver loaded")
    if not want:
        return _result(facts, "driver_version", SKIP, have, None,
                       "no nvidia_driver_branch/nvidia_driver_version pin in the inventory")
    if exact and str(have) != str(exact):
        return _result(facts, "driver_version", FAIL, have, want,
                       f"driver {have} loaded, {exact} pinned")
    if branch and str(have).split(".")[0] != str(branch):
        return _result(facts, "driver_version", FAIL, have, want,
                       f"driver {have} is not of the pinned branch {branch}")
    return _result(facts, "driver_version", PASS, have, want, f"driver {have} as pinned")


def _check_pinned_version(facts: dict, check: str, label: str, missing: str,
                          matches) -> CheckResult:
    """A version read on the node against the inventory pin of the same name."""
    want = _pins(facts).get(check)
    want = str(want) if want else None
    skip = _no_gpu(facts, check, want)
    if skip:
        return skip
    have = _stack(facts).get(check)
    if not have:
        return _result(facts, check, FAIL, None, want, _why(facts, check) or missing)
    if not want:
        return _result(facts, check, SKIP, have, None, f"no {check} pin in the inventory")
    if not matches(str(have), want):
        return _result(facts, check, FAIL, have, want, f"{label} {have} installed, {want} pinned")
    return _result(facts, check, PASS, have, want, f"{label} {have}")


def check_cuda_version(facts: dict, thresholds: dict) -> CheckResult:
    return _check_pinned_version(
        facts, "cuda_version", "CUDA", "no CUDA toolkit found",
        lambda have, want: have == want or have.startswith(want + "."))


def check_nccl_version(facts: dict, thresholds: dict) -> CheckResult:
    return _check_pinned_version(facts, "nccl_version", "libnccl2", "libnccl2 not found",
                                 lambda have, want: have == want)


def check_persistence_mode(facts: dict, thresholds: dict) -> CheckResult:
    want = bool(thresholds.get("require_persistence_mode", True))
    rows, stand_in = _gpus(facts, "persistence_mode", want)
    if stand_in:
        return stand_in
    off = [r["index"] for r in rows if (r.get("persistence_mode") or "").lower() != "enabled"]
    value = f"{len(rows) - len(off)}/{len(rows)} enabled"
    if off and want:
        return _result(facts, "persistence_mode", FAIL, value, want,
                       f"persistence mode off on GPU {', '.join(off)}")
    if off:
        return _result(facts, "persistence_mode", SKIP, value, want,
                       "persistence mode off, but the profile does not require it")
    return _result(facts, "persistence_mode", PASS, value, want, "persistence mode on")


def check_ecc_errors(facts: dict, thresholds: dict) -> CheckResult:
    allowed = int(thresholds.get("max_ecc_uncorrected", 0))
    rows, stand_in = _gpus(facts, "ecc_errors", allowed)
    if stand_in:
        return stand_in
    key = "ecc.errors.uncorrected.volatile.total"
    counts = {r["index"]: _int(r.get(key)) for r in rows}
    known = {i: c for i, c in counts.items() if c is not None}
    if not known:
        return _result(facts, "ecc_errors", SKIP, None, allowed,
                       "ECC is off or not reported on these GPUs")
    worst = max(known.values())
    bad = [f"GPU {i}: {c}" for i, c in known.items() if c > allowed]
    if bad:
        return _result(facts, "ecc_errors", FAIL, worst, allowed,
                       f"uncorrected ECC errors ({'; '.join(bad)})")
    return _result(facts, "ecc_errors", PASS, worst, allowed,
                   f"{len(known)} GPU(s) within {allowed} uncorrected ECC errors")


def check_remapped_rows(facts: dict, thresholds: dict) -> CheckResult:
    skip = _no_gpu(facts, "remapped_rows", 0)
    if skip:
        return skip
    text = (_stack(facts).get("nvidia_smi") or {}).get("remapped_rows")
    rows = parse_remapped_rows(text)
    if not rows:
        reason = _why(facts, "remapped_rows", "nvidia_smi") or "no remapped-rows report"
        return _result(facts, "remapped_rows", SKIP, None, 0,
                       f"row remapping not reported (GPUs before Ampere have none): {reason}")
    bad = [f"{bus}: pending {v['pending']}, failure {v['failure']}" for bus, v in rows.items()
           if (v["pending"] or 0) > 0 or (v["failure"] or 0) > 0]
    if bad:
        return _result(facts, "remapped_rows", FAIL, len(bad), 0,
                       f"row remapping pending or failed ({'; '.join(bad)}): reset or replace")
    return _result(facts, "remapped_rows", PASS, 0, 0, f"{len(rows)} GPU(s) clean")


def check_xid_errors(facts: dict, thresholds: dict) -> CheckResult:
    allowed = int(thresholds.get("max_xid_errors", 0))
    skip = _no_gpu(facts, "xid_errors", allowed)
    if skip:
        return skip
    lines = _stack(facts).get("xid_lines")
    if lines is None:
        return _result(facts, "xid_errors", SKIP, None, allowed,
                       _why(facts, "xid_errors") or "kernel log not read")
    events = parse_xid(lines)
    if len(events) > allowed:
        codes = sorted({e["xid"] for e in events})
        if not events:
            return _result(facts, "xid_errors", FAIL, 0, allowed,
                           f"no XID events, fewer than the {allowed} required")
        return _result(facts, "xid_errors", FAIL, len(events), allowed,
                       f"XID {', '.join(map(str, codes))} in the kernel log; last: "
                       f"{events[-1]['line'][:160]}")
    return _result(facts, "xid_errors", PASS, len(events), allowed, "no XID events since boot"
                   if not events else f"{len(events)} XID event(s), within {allowed}")


DEFAULT_ALLOWED_REASONS = ["gpu_idle", "applications_clocks_setting", "sw_power_cap",
                           "sync_boost", "display_clock_setting"]


def check_clock_throttle(facts: dict, thresholds: dict) -> CheckResult:
    allowed = list(thresholds.get("throttle_reasons_allowed", DEFAULT_ALLOWED_REASONS))
    rows, stand_in = _gpus(facts, "clock_throttle", allowed)
    if stand_in:
        return stand_in
    bad, seen = [], set()
    for r in rows:
        reasons = clock_reasons(r.get("reasons"))
        if reasons is None:
            continue
        seen.update(reasons)
        wrong = [x for x in reasons if x not in allowed]
        if wrong:
            bad.append(f"GPU {r['index']}: {', '.join(wrong)}")
    value = ", ".join(sorted(seen)) or "none"
    if bad:
        return _result(facts, "clock_throttle", FAIL, value, allowed,
                       f"clocks held back ({'; '.join(bad)})")
    return _result(facts, "clock_throttle", PASS, value, allowed, "no harmful clock reasons")


def check_pcie_link(facts: dict, thresholds: dict) -> CheckResult:
    min_gen = thresholds.get("pcie_min_gen")
    min_width = thresholds.get("pcie_min_width")
    want = {"gen": min_gen, "width": min_width}
    rows, stand_in = _gpus(facts, "pcie_link", want)
    if stand_in:
        return stand_in
    bad, values = [], []
    for r in rows:
        gen_now, gen_max = _int(r.get("pcie.link.gen.current")), _int(r.get("pcie.link.gen.max"))
        w_now, w_max = _int(r.get("pcie.link.width.current")), _int(r.get("pcie.link.width.max"))
        values.append(f"Gen{gen_now}/{gen_max} x{w_now}/{w_max}")
        if None in (gen_max, w_now, w_max):
            bad.append(f"GPU {r['index']}: link not reported")
            continue
        # The link trains down its generation when idle (power saving), so the current
        # generation is shown, not judged; a lost lane is never power saving.
        if w_now < w_max:
            bad.append(f"GPU {r['index']}: x{w_now} of x{w_max} lanes")
        if min_width is not None and w_now < min_width:
            bad.append(f"GPU {r['index']}: x{w_now} < x{min_width}")
        if min_gen is not None and gen_max < min_gen:
            bad.append(f"GPU {r['index']}: Gen{gen_max} capable < Gen{min_gen}")
    value = ", ".join(sorted(set(values)))
    if bad:
        return _result(facts, "pcie_link", FAIL, value, want, "; ".join(bad))
    return _result(facts, "pcie_link", PASS, value, want, "every GPU link at full width")


def check_nvlink(facts: dict, thresholds: dict) -> CheckResult:
    want = thresholds.get("nvlink_min_links_up")
    skip = _no_gpu(facts, "nvlink", want)
    if skip:
        return skip
    if not want:
        return _result(facts, "nvlink", SKIP, None, want, "the profile expects no NVLink")
    text = (_stack(facts).get("nvidia_smi") or {}).get("nvlink")
    links = parse_nvlink(text)
    if not links:
        return _result(facts, "nvlink", FAIL, None, want,
                       _why(facts, "nvlink", "nvidia_smi") or "nvidia-smi nvlink -s listed no GPU")
    fewest = min(v["up"] for v in links.values())
    bad = [f"GPU {i}: {v['up']} up, {v['down']} down" for i, v in links.items()
           if v["up"] < want]
    if bad:
        return _result(facts, "nvlink", FAIL, fewest, want, f"NVLink links down ({'; '.join(bad)})")
    return _result(facts, "nvlink", PASS, fewest, want,
                   f"{len(links)} GPU(s), at least {fewest} links up each")


def check_infiniband(facts: dict, thresholds: dict) -> CheckResult:
    min_ports = thresholds.get("ib_min_ports_active")
    min_rate = thresholds.get("ib_min_rate_gbps")
    want = {"ports": min_ports, "gbps": min_rate}
    ports = _stack(facts).get("infiniband")
    if not ports:
        if min_ports:
            return _result(facts, "infiniband", FAIL, 0, want,
                           f"no RDMA device in /sys/class/infiniband, {min_ports} port(s) expected")
        return _result(facts, "infiniband", SKIP, None, want,
                       "no RDMA device (/sys/class/infiniband is empty or absent)")
    active = {p: v for p, v in ports.items() if parse_ib_state(v.get("state")) == "ACTIVE"}
    bad = []
    if min_ports and len(active) < min_ports:
        down = sorted(set(ports) - set(active))
        bad.append(f"{len(active)} port(s) ACTIVE < {min_ports} (not active: {', '.join(down)})")
    if min_rate:
        slow = [f"{p} at {v.get('rate') or '?'}" for p, v in active.items()
                if (parse_ib_rate(v.get("rate")) or 0) < min_rate]
        if slow:
            bad.append(f"slower than {min_rate:g} Gb/s: {', '.join(slow)}")
    value = f"{len(active)}/{len(ports)} active"
    if bad:
        return _result(facts, "infiniband", FAIL, value, want, "; ".join(bad))
    rates = sorted({v.get("rate") or "?" for v in active.values()})
    return _result(facts, "infiniband", PASS, value, want, f"active at {', '.join(rates)}")


def check_gpudirect_rdma(facts: dict, thresholds: dict) -> CheckResult:
    required = bool(thresholds.get("require_gpudirect", True)) and bool(
        _pins(facts).get("rdma_gpudirect", True))
    skip = _no_gpu(facts, "gpudirect_rdma", required)
    if skip:
        return skip
    if not _stack(facts).get("infiniband"):
        return _result(facts, "gpudirect_rdma", SKIP, None, required,
                       "no RDMA device: GPUDirect RDMA does not apply")
    loaded = bool(_stack(facts).get("nvidia_peermem"))
    if not required:
        return _result(facts, "gpudirect_rdma", SKIP, loaded, False,
                       "GPUDirect RDMA not expected (rdma_gpudirect or the profile)")
    if not loaded:
        return _result(facts, "gpudirect_rdma", FAIL, False, True,
                       "nvidia_peermem is not loaded (/sys/module/nvidia_peermem)")
    return _result(facts, "gpudirect_rdma", PASS, True, True, "nvidia_peermem loaded")


def check_nccl_settings(facts: dict, thresholds: dict) -> CheckResult:
    want = dict(_pins(facts).get("nccl_env") or {})
    skip = _no_gpu(facts, "nccl_settings", want or None)
    if skip:
        return skip
    settings = _stack(facts).get("nccl_settings") or {}
    have = {**parse_nccl_conf(settings.get("conf")), **(settings.get("env") or {})}
    where = settings.get("conf_path") or "/etc/nccl.conf"
    if not have:
        return _result(facts, "nccl_settings", FAIL, None, want or None,
                       f"no NCCL settings ({where} absent or empty, no NCCL_* variables)")
    wrong = [f"{k}={have.get(k, '<unset>')} (want {v})" for k, v in want.items()
             if have.get(k) != v]
    value = f"{len(have)} setting(s)"
    if wrong:
        return _result(facts, "nccl_settings", FAIL, value, want,
                       f"NCCL settings differ from the inventory: {'; '.join(wrong)}")
    return _result(facts, "nccl_settings", PASS, value, want or None,
                   f"{where}: {', '.join(sorted(have))}")


def check_dcgm_diag(facts: dict, thresholds: dict) -> CheckResult:
    skip = _no_gpu(facts, "dcgm_diag", "Pass")
    if skip:
        return skip
    text = _stack(facts).get("dcgm_diag")
    if text is None:
        return _result(facts, "dcgm_diag", SKIP, None, "Pass",
                       _why(facts, "dcgm_diag") or "DCGM diagnostics not run")
    results = parse_dcgm_diag(text)
    if not results:
        return _result(facts, "dcgm_diag", FAIL, None, "Pass",
                       "dcgmi diag printed no results: " + text.strip()[-200:])
    failed = [f"{t}: {r}" for t, r in results.items() if r.lower().startswith("fail")]
    value = f"{len(results) - len(failed)}/{len(results)} passed"
    if failed:
        return _result(facts, "dcgm_diag", FAIL, value, "Pass", "; ".join(failed))
    return _result(facts, "dcgm_diag", PASS, value, "Pass", "DCGM diagnostics passed")


NODE_CHECKS: dict[str, Callable[[dict, dict], CheckResult]] = {
    "gpu_count": check_gpu_count,
    "python_env": check_python_env,
    "disk_free": check_disk_free,
    "mem_available": check_mem_available,
    "ssh_peers": check_ssh_peers,
    "time_synced": check_time_synced,
    "gpu_model": check_gpu_model,
    "driver_version": check_driver_version,
    "cuda_version": check_cuda_version,
    "nccl_version": check_nccl_version,
    "persistence_mode": check_persistence_mode,
    "ecc_errors": check_ecc_errors,
    "remapped_rows": check_remapped_rows,
    "xid_errors": check_xid_errors,
    "clock_throttle": check_clock_throttle,
    "pcie_link": check_pcie_link,
    "nvlink": check_nvlink,
    "infiniband": check_infiniband,
    "gpudirect_rdma": check_gpudirect_rdma,
    "nccl_settings": check_nccl_settings,
    "dcgm_diag": check_dcgm_diag,
}


# Checks whose facts the health_check role may leave unknown (listed under "skipped");
# for the others an unknown fact is a failure, and the role's reason goes into the message.
SKIPPABLE = ("time_synced", "ssh_peers")


# The inventory's version pins the node checks compare with.
PIN_VARS = ("nvidia_driver_branch", "nvidia_driver_version", "cuda_version", "nccl_version",
            "rdma_gpudirect")


def node_pins(node) -> dict:
    """What the node checks compare one node with: its version pins (only those set) and
    its full NCCL environment (``nccl_env``, from the node's typed settings)."""
    pins = {k: node.vars[k] for k in PIN_VARS if (node.vars or {}).get(k) not in (None, "")}
    pins["nccl_env"] = dict(node.settings.nccl_env)
    return pins


def run_node_checks(node: str, facts: dict | None, thresholds: dict,
                    pins: dict | None = None) -> list[CheckResult]:
    """Every node check for one node; a check the role skipped is a skip with its reason.

    ``pins`` come from :func:`node_pins`.
    """
    if facts is None:
        return [CheckResult(node, "facts", FAIL, None, None,
                            "no facts from this node (health_check did not report)")]
    facts = {**facts, "host": facts.get("host") or node, "pins": pins or {}}
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
    row = _largest(bench)
    if row is None:
        return CheckResult(node, check, FAIL, None, minimum,
                           "the benchmark reported no sizes")
    if int(bench.get("world_size") or 0) < 2:
        return CheckResult(node, check, SKIP, 0.0, minimum,
                           "one rank: an all-reduce moves nothing over a bus")
    busbw = max(row["out_of_place"]["busbw_gbs"], row["in_place"]["busbw_gbs"])
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


GPU_NODE_CHECKS = ("gpu_model", "driver_version", "cuda_version", "nccl_version",
                   "persistence_mode", "ecc_errors", "remapped_rows", "xid_errors",
                   "clock_throttle", "pcie_link", "nvlink", "infiniband", "gpudirect_rdma",
                   "nccl_settings", "dcgm_diag")


# --------------------------------------------------------------------------- compute checks


def run_perf_checks(node: str, perf: dict | None, thresholds: dict,
                    error: str | None = None) -> list[CheckResult]:
    """matmul TFLOP/s and memory copy GB/s of trainer.bench.gpu_perf, per device, on one node.

    The slowest device is the node's value: one slow GPU holds back every collective.
    """
    specs = (("matmul_tflops", "matmul_min_tflops", "TFLOP/s", "bf16 matmul"),
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
        worst = min(devices, key=lambda d: d[key])
        value = round(float(worst[key]), 3)
        kind = perf.get("device", "?")
        where = f"{worst.get('name', kind)} {worst.get('index', '')}".strip()
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


# --------------------------------------------------------------------------- nccl-tests

_NCCL_ROW_RE = re.compile(
    r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(-?\d+)"
    r"\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def parse_nccl_tests(text: str) -> dict[str, Any]:
    """all_reduce_perf's table, in the shape of trainer.bench.allreduce's results."""
    ranks = None
    header = re.search(r"nThread\s+(\d+)\s+nGpus\s+(\d+)", text)
    rank_lines = re.findall(r"^#\s+Rank\s+\d+", text, re.MULTILINE)
    if rank_lines:
        ranks = len(rank_lines)
    elif header:
        ranks = int(header.group(1)) * int(header.group(2))
    results = []
    for line in text.splitlines():
        match = _NCCL_ROW_RE.match(line)
        if not match:
            continue
        g = match.groups()

        def mode(t, a, b, w):
            wrong = int(w) if w.isdigit() else 0
            return {"time_us": _num(t), "algbw_gbs": _num(a), "busbw_gbs": _num(b),
                    "wrong": wrong}

        results.append({"size": int(g[0]), "count": int(g[1]), "type": g[2], "redop": g[3],
                        "out_of_place": mode(*g[5:9]), "in_place": mode(*g[9:13])})
    avg = re.search(r"Avg bus bandwidth\s*:\s*([\d.]+)", text)
    wrong = sum(r["out_of_place"]["wrong"] + r["in_place"]["wrong"] for r in results)
    return {"world_size": ranks, "backend": "nccl-tests", "results": results,
            "wrong_total": wrong, "avg_busbw_gbs": float(avg.group(1)) if avg else None}
