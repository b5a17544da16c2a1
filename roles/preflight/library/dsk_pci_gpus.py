#!/usr/bin/python
"""Count NVIDIA GPUs and NVSwitches from sysfs (works without lspci or a driver)."""

from __future__ import annotations

import os

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: dsk_pci_gpus
short_description: Detect NVIDIA GPUs and NVSwitches on the PCI bus
description:
  - Reads vendor, class and device of every entry under /sys/bus/pci/devices.
  - A GPU is a device of vendor 0x10de with class 0x0300 (VGA) or 0x0302 (3D controller).
  - An NVSwitch is an NVIDIA device whose id is in I(nvswitch_pci_ids) or whose class is
    0x0680 (other bridge); a non-empty /proc/driver/nvidia-nvswitch/devices also counts.
  - Read-only; supports check mode.
options:
  nvswitch_pci_ids:
    description: NVSwitch PCI device ids, hex with 0x prefix.
    type: list
    elements: str
    default: []
  sysfs_root:
    description: Where PCI devices are listed (tests point it at a fake tree).
    type: path
    default: /sys/bus/pci/devices
"""

RETURN = r"""
ansible_facts:
  description: dsk_gpu_count_detected, dsk_gpus_detected (list of {address, device_id}),
    dsk_nvswitch_count, dsk_has_nvswitch.
  returned: always
  type: dict
"""


NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")
BRIDGE_OTHER_CLASS = "0x0680"
NVSWITCH_PROC_DIR = "/proc/driver/nvidia-nvswitch/devices"


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip().lower()
    except OSError:
        return ""


def scan(sysfs_root: str, nvswitch_ids: set[str]) -> dict:
    gpus: list[dict] = []
    nvswitches = 0
    entries = sorted(os.listdir(sysfs_root)) if os.path.isdir(sysfs_root) else []
    for entry in entries:
        base = os.path.join(sysfs_root, entry)
        if _read(os.path.join(base, "vendor")) != NVIDIA_VENDOR:
            continue
        pci_class = _read(os.path.join(base, "class"))[:6]
        device = _read(os.path.join(base, "device"))
        if pci_class in GPU_CLASSES:
            gpus.append({"address": entry, "device_id": device})
        elif device in nvswitch_ids or pci_class == BRIDGE_OTHER_CLASS:
            nvswitches += 1
    proc_nvswitch = os.path.isdir(NVSWITCH_PROC_DIR) and bool(os.listdir(NVSWITCH_PROC_DIR))
    return {
        "dsk_gpu_count_detected": len(gpus),
        "dsk_gpus_detected": gpus,
        "dsk_nvswitch_count": nvswitches,
        "dsk_has_nvswitch": nvswitches > 0 or proc_nvswitch,
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "nvswitch_pci_ids": {"type": "list", "elements": "str", "default": []},
            "sysfs_root": {"type": "path", "default": "/sys/bus/pci/devices"},
        },
        supports_check_mode=True,
    )
    ids = {value.strip().lower() for value in module.params["nvswitch_pci_ids"]}
    module.exit_json(changed=False, ansible_facts=scan(module.params["sysfs_root"], ids))


if __name__ == "__main__":
    main()
