"""Parsers of raw node outputs: what the health_check role reports and what nccl-tests prints.

The health_check role reports raw command outputs under facts["gpu_stack"]; these
functions read them. Formats: nvidia-smi --query-gpu ... --format=csv,noheader,nounits
(one line per GPU, fields in the order the role asked for, "[N/A]"/"[Not Supported]"
for unknown), nvidia-smi --query-remapped-rows, nvidia-smi nvlink -s, the kernel log's
"NVRM: Xid (PCI:<bus>): <code>, ..." lines, /sys/class/infiniband/<hca>/ports/<n>/{state,
rate}, /etc/nccl.conf (KEY=VALUE lines), the table of `dcgmi diag -r <level>` and the
table of nccl-tests' all_reduce_perf.
"""

from __future__ import annotations

import re
from typing import Any

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


def parse_int(value: str | None) -> int | None:
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
    value = parse_int(mask)
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
            return 1 if low == "yes" else 0 if low == "no" else parse_int(_field(v))

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


_NCCL_ROW_RE = re.compile(
    r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(-?\d+)"
    r"\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def parse_nccl_tests(text: str) -> dict[str, Any]:
    """all_reduce_perf's table, in the shape of the all-reduce probe's results."""
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
