"""The one scan of the PCI bus for NVIDIA functions, shared by the node-side modules
(library/dsk_gpu_node_state.py for preflight and the GPU roles, the health_check role's
dsk_node_facts for validate). Ansible ships it with them: modules import it as
``ansible.module_utils.dsk_pci`` (ansible.cfg: module_utils = module_utils)."""

from __future__ import annotations

import os

SYSFS_PCI = "/sys/bus/pci/devices"
NVIDIA_VENDOR = "0x10de"
# VGA and 3D controllers (the class's first two bytes): what counts as a GPU.
GPU_CLASSES = ("0x0300", "0x0302")
# "Other bridge": the class NVSwitches report.
BRIDGE_OTHER_CLASS = "0x0680"


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip().lower()
    except OSError:
        return ""


def scan(root: str, nvswitch_ids=()) -> dict:
    """NVIDIA functions under ``root`` (a sysfs PCI device directory), in address order:
    ``gpus`` (``{"address", "device_id"}`` for each VGA or 3D controller) and
    ``nvswitches`` (the count of functions of class 0x0680 or whose device id is in
    ``nvswitch_ids``). A missing or unreadable directory has neither."""
    ids = {value.strip().lower() for value in nvswitch_ids}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        entries = []
    gpus: list[dict] = []
    nvswitches = 0
    for entry in entries:
        base = os.path.join(root, entry)
        if _read(os.path.join(base, "vendor")) != NVIDIA_VENDOR:
            continue
        pci_class = _read(os.path.join(base, "class"))[:6]
        device = _read(os.path.join(base, "device"))
        if pci_class in GPU_CLASSES:
            gpus.append({"address": entry, "device_id": device})
        elif pci_class == BRIDGE_OTHER_CLASS or device in ids:
            nvswitches += 1
    return {"gpus": gpus, "nvswitches": nvswitches}
