#!/usr/bin/python
"""Everything preflight checks and the GPU roles gate on, read from sysfs, /dev and /proc
in one execution."""

from __future__ import annotations

import os
import re

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: dsk_gpu_node_state
short_description: Detect NVIDIA GPUs, NVSwitches, HCAs, the loaded driver and modprobe
description:
  - One read-only probe for preflight and the GPU roles, so that a bootstrap costs one
    module execution per host instead of one per question (preflight runs it; the GPU
    roles run it only when preflight did not, e.g. gpu_stack.yml on its own).
  - A GPU is a PCI function of vendor 0x10de with class 0x0300xx (VGA) or 0x0302xx
    (3D controller). An NVSwitch is an NVIDIA PCI function of class 0x0680xx (other
    bridge) or shows up as /dev/nvidia-nvswitch*.
  - RDMA devices are the entries of /sys/class/infiniband; the loaded driver version is
    read from /proc/driver/nvidia/version.
  - Besides the keys below it sets facts (ansible_facts) for later roles -
    dsk_gpu_count_detected, dsk_gpus_detected (list of {address, device_id}),
    dsk_nvswitch_count (NVIDIA functions whose id is in I(nvswitch_pci_ids) or of class
    0x0680), dsk_has_nvswitch (that count, a non-empty /proc/driver/nvidia-nvswitch/devices
    or a /dev/nvidia-nvswitch* node), dsk_rdma_devices, dsk_nvidia_driver_loaded,
    dsk_modprobe.
  - Supports check mode.
options:
  nvswitch_pci_ids:
    description: NVSwitch PCI device ids, hex with 0x prefix.
    type: list
    elements: str
    default: []
  nvswitch_proc_dir:
    description: The NVSwitch driver's device list (non-empty on a loaded NVSwitch driver).
    type: path
    default: /proc/driver/nvidia-nvswitch/devices
  sysfs_pci:
    description: Where PCI functions are listed (tests point it at a fake tree).
    type: path
    default: /sys/bus/pci/devices
  dev_dir:
    description: Where device nodes are.
    type: path
    default: /dev
  infiniband_dir:
    description: The RDMA device class directory.
    type: path
    default: /sys/class/infiniband
  driver_version_file:
    description: The loaded NVIDIA kernel module's version file.
    type: path
    default: /proc/driver/nvidia/version
  modprobe_paths:
    description: Candidate paths of modprobe, first existing one wins.
    type: list
    elements: path
    default: [/usr/sbin/modprobe, /sbin/modprobe]
"""

RETURN = r"""
gpu_count:
  description: NVIDIA GPUs on the PCI bus.
  returned: always
  type: int
nvswitch:
  description: Whether an NVSwitch is present (PCI bridge or device node).
  returned: always
  type: bool
rdma_devices:
  description: Names under /sys/class/infiniband, sorted.
  returned: always
  type: list
driver_loaded:
  description: Version of the loaded NVIDIA kernel module, empty when none is loaded.
  returned: always
  type: str
modprobe:
  description: Path of modprobe, empty when it is not installed.
  returned: always
  type: str
"""

NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")
BRIDGE_OTHER_CLASS = "0x0680"
DRIVER_VERSION = re.compile(r"\s(\d{3,}\.\d+(?:\.\d+)?)\s")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def probe(params: dict) -> dict:
    gpus = 0
    nvswitch_pci = False
    for entry in _listdir(params["sysfs_pci"]):
        base = os.path.join(params["sysfs_pci"], entry)
        if _read(os.path.join(base, "vendor")).strip().lower() != NVIDIA_VENDOR:
            continue
        pci_class = _read(os.path.join(base, "class")).strip().lower()
        if pci_class.startswith(GPU_CLASSES):
            gpus += 1
        elif pci_class.startswith(BRIDGE_OTHER_CLASS):
            nvswitch_pci = True
    nvswitch_nodes = [n for n in _listdir(params["dev_dir"]) if n.startswith("nvidia-nvswitch")]
    match = DRIVER_VERSION.search(_read(params["driver_version_file"]))
    modprobe = next((p for p in params["modprobe_paths"] if os.path.exists(p)), "")
    return {
        "gpu_count": gpus,
        "nvswitch": nvswitch_pci or bool(nvswitch_nodes),
        "rdma_devices": _listdir(params["infiniband_dir"]),
        "driver_loaded": match.group(1) if match else "",
        "modprobe": modprobe,
    }


def pci_facts(params: dict) -> dict:
    """Preflight's facts: the GPUs by PCI address and the NVSwitches."""
    ids = {value.strip().lower() for value in params.get("nvswitch_pci_ids") or []}
    gpus: list[dict] = []
    nvswitches = 0
    for entry in _listdir(params["sysfs_pci"]):
        base = os.path.join(params["sysfs_pci"], entry)
        if _read(os.path.join(base, "vendor")).strip().lower() != NVIDIA_VENDOR:
            continue
        pci_class = _read(os.path.join(base, "class")).strip().lower()[:6]
        device = _read(os.path.join(base, "device")).strip().lower()
        if pci_class in GPU_CLASSES:
            gpus.append({"address": entry, "device_id": device})
        elif device in ids or pci_class == BRIDGE_OTHER_CLASS:
            nvswitches += 1
    proc_dir = params.get("nvswitch_proc_dir") or "/proc/driver/nvidia-nvswitch/devices"
    nodes = [n for n in _listdir(params["dev_dir"]) if n.startswith("nvidia-nvswitch")]
    return {
        "dsk_gpu_count_detected": len(gpus),
        "dsk_gpus_detected": gpus,
        "dsk_nvswitch_count": nvswitches,
        "dsk_has_nvswitch": nvswitches > 0 or bool(_listdir(proc_dir)) or bool(nodes),
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "sysfs_pci": {"type": "path", "default": "/sys/bus/pci/devices"},
            "dev_dir": {"type": "path", "default": "/dev"},
            "infiniband_dir": {"type": "path", "default": "/sys/class/infiniband"},
            "driver_version_file": {"type": "path", "default": "/proc/driver/nvidia/version"},
            "modprobe_paths": {"type": "list", "elements": "path",
                               "default": ["/usr/sbin/modprobe", "/sbin/modprobe"]},
            "nvswitch_pci_ids": {"type": "list", "elements": "str", "default": []},
            "nvswitch_proc_dir": {"type": "path",
                                  "default": "/proc/driver/nvidia-nvswitch/devices"},
        },
        supports_check_mode=True,
    )
    state = probe(module.params)
    facts = dict(pci_facts(module.params), dsk_rdma_devices=state["rdma_devices"],
                 dsk_nvidia_driver_loaded=state["driver_loaded"], dsk_modprobe=state["modprobe"])
    module.exit_json(changed=False, ansible_facts=facts, **state)


if __name__ == "__main__":
    main()
