"""Node checks: small functions of one node's facts (from the health_check role, one JSON
per node at ``<run_dir>/facts/<host>.json``), its thresholds and its inventory pins.

Every check returns a :class:`CheckResult` that names the node; what cannot be judged is
a ``skip`` with the reason, never a silent pass.
"""

from __future__ import annotations

from collections.abc import Callable

from dsk_provision.defaults import resolve
from dsk_provision.validation.parsers import (
    clock_reasons,
    parse_dcgm_diag,
    parse_gpu_query,
    parse_ib_rate,
    parse_ib_state,
    parse_int,
    parse_nccl_conf,
    parse_nvlink,
    parse_remapped_rows,
    parse_xid,
)
from dsk_provision.validation.results import FAIL, PASS, SKIP, CheckResult


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
    counts = {r["index"]: parse_int(r.get(key)) for r in rows}
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
        gen_now = parse_int(r.get("pcie.link.gen.current"))
        gen_max = parse_int(r.get("pcie.link.gen.max"))
        w_now = parse_int(r.get("pcie.link.width.current"))
        w_max = parse_int(r.get("pcie.link.width.max"))
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


# The version pins the node checks compare with, by the role whose defaults hold them.
PIN_VARS = {"nvidia_driver_branch": "nvidia_driver", "nvidia_driver_version": "nvidia_driver",
            "cuda_version": "cuda", "nccl_version": "nccl", "rdma_gpudirect": "rdma"}


def node_pins(node) -> dict:
    """What the node checks compare one node with: its version pins (the inventory's value,
    else the default bootstrap installs; empty ones left out) and its full NCCL environment
    (``nccl_env``, from the node's typed settings)."""
    pins = {}
    for name, role in PIN_VARS.items():
        value = resolve(name, node.vars or {}, role=role)
        if value not in (None, ""):
            pins[name] = value
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


GPU_NODE_CHECKS = ("gpu_model", "driver_version", "cuda_version", "nccl_version",
                   "persistence_mode", "ecc_errors", "remapped_rows", "xid_errors",
                   "clock_throttle", "pcie_link", "nvlink", "infiniband", "gpudirect_rdma",
                   "nccl_settings", "dcgm_diag")
