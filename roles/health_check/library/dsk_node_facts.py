#!/usr/bin/python
"""Gather one node's facts for `dsk-provision validate` in a single module call."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dsk_pci import SYSFS_PCI, scan

DOCUMENTATION = r"""
module: dsk_node_facts
short_description: Gather a node's facts for validate (OS, CPU, memory, disk, GPUs, Python, SSH)
description:
  - Gathers only; judging against thresholds happens on the control node.
  - Checks that do not apply are listed under C(skipped) with a reason.
  - Read-only; supports check mode.
options:
  host:
    description: Inventory name of the node.
    type: str
    required: true
  gpus_declared:
    description: GPUs the inventory declares.
    type: int
    required: true
  dsk_root:
    description: Root of dsk files; its free space is reported.
    type: path
    required: true
  python:
    description: Trainer interpreter to probe.
    type: path
    required: true
  python_timeout:
    description: Seconds for the interpreter probe.
    type: int
    required: true
  ssh_peers:
    description: Names of the other nodes.
    type: list
    elements: str
    required: true
  check_ssh:
    description: Test SSH to every peer.
    type: bool
    required: true
  ssh_timeout:
    description: Seconds per SSH test.
    type: int
    required: true
  sysfs_pci_root:
    description: PCI device listing (tests point it at a fake tree).
    type: path
    default: /sys/bus/pci/devices
  cuda_home:
    description: CUDA toolkit directory whose version.json (or bin/nvcc) gives the CUDA version.
    type: path
    required: true
  nccl_conf:
    description: NCCL settings file whose text is reported.
    type: path
    required: true
  dcgm_level:
    description: dcgmi diag run level (1 quick, 2 medium, 3 long); 0 runs no diagnostics.
    type: int
    required: true
  dcgm_timeout:
    description: Seconds the DCGM diagnostics may take.
    type: int
    required: true
"""

RETURN = r"""
node_facts:
  description: The facts, as written to <run dir>/facts/<host>.json.
  returned: always
  type: dict
"""


DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"
PYTHON_PROBE = r"""
import json, sys
out = {"path": sys.executable, "version": sys.version.split()[0],
       "torch": None, "cuda_available": None}
try:
    import torch
except Exception:
    pass
else:
    out["torch"] = torch.__version__
    out["cuda_available"] = bool(torch.cuda.is_available())
print(json.dumps(out))
"""


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:g} s"
    return proc.returncode, proc.stdout, proc.stderr


def os_release() -> dict:
    fields: dict[str, str] = {}
    for line in (_read("/etc/os-release") or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value.strip().strip('"')
    names = {"debian": "Debian", "ubuntu": "Ubuntu"}
    distribution = names.get(fields.get("ID", ""), fields.get("NAME"))
    return {"distribution": distribution, "version": fields.get("VERSION_ID")}


def memory_mb() -> tuple[int | None, int | None]:
    values = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) // 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def free_gb(path: str) -> float:
    stat = os.statvfs(path)
    return round(stat.f_bavail * stat.f_frsize / 1024**3, 2)


def pci_gpus(root: str) -> list[str]:
    """The NVIDIA GPUs on the PCI bus as vendor:device ids."""
    return ["10de:" + gpu["device_id"].removeprefix("0x") for gpu in scan(root)["gpus"]]


def gpu_models(pci_ids: list[str], skipped: dict) -> list[str]:
    """GPU names from nvidia-smi when it works, else the PCI ids (vendor:device)."""
    if not pci_ids:
        return []
    if shutil.which("nvidia-smi"):
        rc, out, err = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], 30)
        names = [line.strip() for line in out.splitlines() if line.strip()]
        if rc == 0 and names:
            return names
        skipped["gpu_models"] = f"nvidia-smi failed ({err.strip() or rc}); PCI ids reported"
    else:
        skipped["gpu_models"] = "nvidia-smi not installed; PCI ids reported"
    return pci_ids


def nvidia_driver() -> str | None:
    text = _read(DRIVER_VERSION_FILE)
    if not text:
        return None
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else text.splitlines()[0].strip()


def python_facts(python: str, timeout: int, skipped: dict) -> dict:
    empty = {"path": python, "version": None, "torch": None, "cuda_available": None}
    if not os.access(python, os.X_OK):
        skipped["python"] = f"{python} does not exist or is not executable"
        return empty
    rc, out, err = _run([python, "-c", PYTHON_PROBE], timeout)
    if rc != 0:
        skipped["python"] = f"{python} failed (rc {rc}): {(err or out).strip()[-300:]}"
        return empty
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        skipped["python"] = f"{python} printed no facts: {(err or out).strip()[-300:]}"
        return empty


def time_synced(skipped: dict) -> bool | None:
    reasons = []
    if shutil.which("timedatectl"):
        rc, out, err = _run(["timedatectl", "show", "--property=NTPSynchronized", "--value"], 10)
        if rc == 0 and out.strip() in ("yes", "no"):
            return out.strip() == "yes"
        reasons.append(f"timedatectl: {(err or out).strip() or 'rc ' + str(rc)}")
    if shutil.which("chronyc"):
        rc, out, err = _run(["chronyc", "-n", "tracking"], 10)
        match = re.search(r"^Leap status\s*:\s*(.+)$", out, re.MULTILINE)
        if rc == 0 and match:
            return match.group(1).strip() == "Normal"
        reasons.append(f"chronyc: {(err or out).strip() or 'rc ' + str(rc)}")
    skipped["time_synced"] = "; ".join(reasons) or "neither timedatectl nor chronyc is installed"
    return None


def ssh_peers(peers: list[str], timeout: int) -> dict[str, bool]:
    def reach(peer: str) -> bool:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", peer, "true"]
        return _run(argv, timeout + 5)[0] == 0

    if not peers:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(peers))) as pool:
        return dict(zip(peers, pool.map(reach, peers), strict=True))


# nvidia-smi fields, in this order, one CSV line per GPU (parsed on the control node).
# Drivers before 535 call the clock reasons clocks_throttle_reasons.*; newer ones accept
# clocks_event_reasons.* (and keep the old name as an alias for a while).
GPU_QUERY = ("index,name,pci.bus_id,driver_version,persistence_mode,"
             "ecc.errors.uncorrected.volatile.total,pcie.link.gen.current,pcie.link.gen.max,"
             "pcie.link.width.current,pcie.link.width.max,{reasons}.active")
GPU_QUERY_REASONS = ("clocks_event_reasons", "clocks_throttle_reasons")
REMAPPED_QUERY = "gpu_bus_id,remapped_rows.pending,remapped_rows.failure"
XID_RE = re.compile(r"NVRM: Xid")


def _first_line(text: str, rc: int) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"rc {rc}"


def nvidia_smi_facts(skipped: dict) -> dict:
    """Raw nvidia-smi outputs: the per-GPU query, remapped rows, NVLink status."""
    out: dict = {"query": None, "query_fields": None, "remapped_rows": None, "nvlink": None}
    if not shutil.which("nvidia-smi"):
        skipped["nvidia_smi"] = "nvidia-smi is not installed"
        return out
    errors = []
    for reasons in GPU_QUERY_REASONS:
        fields = GPU_QUERY.format(reasons=reasons)
        rc, text, err = _run(["nvidia-smi", f"--query-gpu={fields}",
                              "--format=csv,noheader,nounits"], 60)
        if rc == 0:
            out["query"], out["query_fields"] = text, fields
            break
        errors.append(_first_line(err or text, rc))
    else:
        skipped["nvidia_smi"] = f"nvidia-smi --query-gpu failed: {errors[-1]}"
        return out
    rc, text, err = _run(["nvidia-smi", f"--query-remapped-rows={REMAPPED_QUERY}",
                          "--format=csv,noheader,nounits"], 60)
    if rc == 0:
        out["remapped_rows"] = text
    else:
        skipped["remapped_rows"] = ("nvidia-smi --query-remapped-rows: "
                                    + _first_line(err or text, rc))
    rc, text, err = _run(["nvidia-smi", "nvlink", "-s"], 60)
    if rc == 0:
        out["nvlink"] = text
    else:
        skipped["nvlink"] = f"nvidia-smi nvlink -s: {_first_line(err or text, rc)}"
    return out


def cuda_version(cuda_home: str, skipped: dict) -> str | None:
    text = _read(os.path.join(cuda_home, "version.json"))
    if text:
        try:
            return str(json.loads(text)["cuda"]["version"])
        except (ValueError, KeyError, TypeError):
            pass
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if os.access(nvcc, os.X_OK):
        rc, out, _ = _run([nvcc, "--version"], 30)
        match = re.search(r"release \S+, V(\d+(?:\.\d+)+)", out)
        if rc == 0 and match:
            return match.group(1)
    skipped["cuda_version"] = f"no CUDA toolkit at {cuda_home} (version.json, bin/nvcc)"
    return None


def nccl_package_version(skipped: dict) -> str | None:
    if not shutil.which("dpkg-query"):
        skipped["nccl_version"] = "dpkg-query is not installed (not a Debian/Ubuntu node)"
        return None
    rc, out, err = _run(["dpkg-query", "-W", "-f=${Version}", "libnccl2"], 30)
    if rc != 0 or not out.strip():
        skipped["nccl_version"] = "libnccl2 is not installed"
        return None
    return out.strip()


def kernel_xid_lines(skipped: dict) -> list[str] | None:
    """NVIDIA XID lines of the kernel log (dmesg, else the journal); None when unreadable."""
    reasons = []
    for argv in (["dmesg", "--notime"], ["journalctl", "-k", "-b", "--no-pager", "-q"]):
        if not shutil.which(argv[0]):
            reasons.append(f"{argv[0]}: not installed")
            continue
        rc, out, err = _run(argv, 60)
        if rc == 0:
            return [line.strip() for line in out.splitlines() if XID_RE.search(line)][-50:]
        reasons.append(f"{argv[0]}: {_first_line(err or out, rc)}")
    skipped["xid_errors"] = "kernel log unreadable (" + "; ".join(reasons) + ")"
    return None


def infiniband_ports(root: str = "/sys/class/infiniband") -> dict | None:
    """{"<hca>/<port>": {"state", "rate", "link_layer"}}; None without an RDMA device."""
    if not os.path.isdir(root) or not os.listdir(root):
        return None
    ports = {}
    for hca in sorted(os.listdir(root)):
        base = os.path.join(root, hca, "ports")
        for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            where = os.path.join(base, port)
            ports[f"{hca}/{port}"] = {
                name: (_read(os.path.join(where, name)) or "").strip() or None
                for name in ("state", "rate", "link_layer")}
    return ports


def nccl_settings(path: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    return {"conf_path": path, "conf": _read(path), "env": env}


def dcgm_diag(level: int, timeout: int, skipped: dict) -> str | None:
    if level <= 0:
        skipped["dcgm_diag"] = "health_check_dcgm_level is 0"
        return None
    if not shutil.which("dcgmi"):
        skipped["dcgm_diag"] = "dcgmi is not installed (DCGM)"
        return None
    rc, out, err = _run(["dcgmi", "diag", "-r", str(level)], timeout)
    if not out.strip():
        skipped["dcgm_diag"] = f"dcgmi diag -r {level}: {_first_line(err, rc)}"
        return None
    return out


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def gpu_stack(params: dict, skipped: dict, gpus_present: bool) -> dict:
    """Raw outputs for the GPU node checks; parsing happens on the control node."""
    stack: dict = {"nvidia_smi": None, "cuda_version": None, "nccl_version": None,
                   "xid_lines": None, "dcgm_diag": None}
    if gpus_present:
        stack["nvidia_smi"] = nvidia_smi_facts(skipped)
        stack["cuda_version"] = cuda_version(params["cuda_home"], skipped)
        stack["nccl_version"] = nccl_package_version(skipped)
        stack["xid_lines"] = kernel_xid_lines(skipped)
        stack["dcgm_diag"] = dcgm_diag(params["dcgm_level"], params["dcgm_timeout"], skipped)
    stack["infiniband"] = infiniband_ports()
    stack["nvidia_peermem"] = os.path.isdir("/sys/module/nvidia_peermem")
    stack["nccl_settings"] = nccl_settings(params["nccl_conf"])
    stack["systemd"] = systemd_running()
    return stack


def gather(params: dict) -> dict:
    skipped: dict[str, str] = {}
    total, available = memory_mb()
    disk = {"/": free_gb("/")}
    root = params["dsk_root"]
    if os.path.isdir(root):
        disk[root] = free_gb(root)
    else:
        disk[root] = None
        skipped["disk_free_gb"] = f"{root} does not exist"
    detected = pci_gpus(params["sysfs_pci_root"])
    driver = nvidia_driver()
    if driver is None:
        skipped["nvidia_driver"] = f"{DRIVER_VERSION_FILE} is absent (no NVIDIA driver loaded)"
    if params["check_ssh"] and shutil.which("ssh"):
        peers = ssh_peers(params["ssh_peers"], params["ssh_timeout"])
    else:
        peers = {}
        skipped["ssh_peers"] = ("ssh client not installed" if params["check_ssh"]
                                else "health_check_ssh_peers is false")
    return {
        "host": params["host"],
        "hostname": socket.gethostname(),
        "os": os_release(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_total_mb": total,
        "mem_available_mb": available,
        "disk_free_gb": disk,
        "gpus": {
            "declared": params["gpus_declared"],
            "detected": len(detected),
            "models": gpu_models(detected, skipped),
        },
        "nvidia_driver": driver,
        "python": python_facts(params["python"], params["python_timeout"], skipped),
        "time_synced": time_synced(skipped),
        "ssh_peers": peers,
        "gpu_stack": gpu_stack(params, skipped, bool(detected) or driver is not None),
        "skipped": skipped,
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "host": {"type": "str", "required": True},
            "gpus_declared": {"type": "int", "required": True},
            "dsk_root": {"type": "path", "required": True},
            "python": {"type": "path", "required": True},
            "python_timeout": {"type": "int", "required": True},
            "ssh_peers": {"type": "list", "elements": "str", "required": True},
            "check_ssh": {"type": "bool", "required": True},
            "ssh_timeout": {"type": "int", "required": True},
            "sysfs_pci_root": {"type": "path", "default": SYSFS_PCI},
            "cuda_home": {"type": "path", "required": True},
            "nccl_conf": {"type": "path", "required": True},
            "dcgm_level": {"type": "int", "required": True},
            "dcgm_timeout": {"type": "int", "required": True},
        },
        supports_check_mode=True,
    )
    module.exit_json(changed=False, node_facts=gather(module.params))


if __name__ == "__main__":
    main()
