#!/usr/bin/python
"""Everything preflight checks and the GPU roles gate on, read from sysfs, /dev and /proc
in one execution."""

from __future__ import annotations

import os
import re

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dsk_pci import SYSFS_PCI, scan

DOCUMENTATION = r"""
module: dsk_gpu_node_state
short_description: Detect NVIDIA GPUs, NVSwitches, HCAs, the loaded driver and modprobe
description:
  - One read-only probe for preflight and the GPU roles, so that a bootstrap costs one
    module execution per host instead of one per question (preflight runs it; the GPU
    roles run it only when preflight did not, e.g. site.yml --tags gpu_stack).
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
    """The state the GPU roles gate on (one PCI scan)."""
    return _probe(params, scan(params["sysfs_pci"], params.get("nvswitch_pci_ids") or []))


def _probe(params: dict, pci: dict) -> dict:
    nvswitch_nodes = [n for n in _listdir(params["dev_dir"]) if n.startswith("nvidia-nvswitch")]
    match = DRIVER_VERSION.search(_read(params["driver_version_file"]))
    modprobe = next((p for p in params["modprobe_paths"] if os.path.exists(p)), "")
    return {
        "gpu_count": len(pci["gpus"]),
        "nvswitch": pci["nvswitches"] > 0 or bool(nvswitch_nodes),
        "rdma_devices": _listdir(params["infiniband_dir"]),
        "driver_loaded": match.group(1) if match else "",
        "modprobe": modprobe,
    }


def pci_facts(params: dict, pci: dict | None = None) -> dict:
    """Preflight's facts: the GPUs by PCI address and the NVSwitches."""
    if pci is None:
        pci = scan(params["sysfs_pci"], params.get("nvswitch_pci_ids") or [])
    nodes = [n for n in _listdir(params["dev_dir"]) if n.startswith("nvidia-nvswitch")]
    return {
        "dsk_gpu_count_detected": len(pci["gpus"]),
        "dsk_gpus_detected": pci["gpus"],
        "dsk_nvswitch_count": pci["nvswitches"],
        "dsk_has_nvswitch": (pci["nvswitches"] > 0 or bool(_listdir(params["nvswitch_proc_dir"]))
                             or bool(nodes)),
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "sysfs_pci": {"type": "path", "default": SYSFS_PCI},
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
    pci = scan(module.params["sysfs_pci"], module.params["nvswitch_pci_ids"])
    state = _probe(module.params, pci)
    facts = dict(pci_facts(module.params, pci), dsk_rdma_devices=state["rdma_devices"],
                 dsk_nvidia_driver_loaded=state["driver_loaded"], dsk_modprobe=state["modprobe"])
    module.exit_json(changed=False, ansible_facts=facts, **state)


if __name__ == "__main__":
    main()
