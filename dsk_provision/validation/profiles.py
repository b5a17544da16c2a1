"""Hardware profiles: the thresholds of ``validate``.

A profile is a file ``profiles/<name>.yml`` beside this module (description, benchmark
settings, thresholds); the inventory's ``dsk_profile`` names one. The thresholds in use
are the profile's, overridden by the inventory's ``dsk_thresholds`` mapping, overridden
by the caller; every name and value is checked before anything runs.
"""

from __future__ import annotations

from typing import Any

import yaml

from dsk_provision.errors import InputError
from dsk_provision.inventory import PROFILES_DIR, known_profiles

# The profile of an inventory without GPUs.
CPU_PROFILE = "cpu-sandbox"

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
    "matmul_min_tflops": ((int, float),
                          "bf16 matmul per GPU (float32 per CPU node without GPUs), TFLOP/s"),
    "copy_min_gbs": ((int, float), "device memory copy per GPU, read + write, GB/s"),
}



def profile_names() -> list[str]:
    """The names of the hardware profiles."""
    return list(known_profiles() or ())


def read_profile(name: str, *, file: str | None = None,
                 field: str = "all.vars.dsk_profile") -> dict[str, Any]:
    """A hardware profile (description, GPU memory, benchmark settings, thresholds), checked.

    An unknown name is an InputError naming ``field`` in ``file`` (the inventory).
    """
    path = PROFILES_DIR / f"{name}.yml"
    if not path.is_file():
        raise InputError(f"unknown hardware profile {name!r}", file=file, field=field,
                         hint=f"choose one of: {', '.join(profile_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    check_thresholds(data.get("thresholds") or {}, file=str(path), prefix="thresholds")
    memory = data.get("gpu_memory_gib")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                               or memory <= 0):
        raise InputError(f"must be a positive number of GiB, got {memory!r}", file=str(path),
                         field="gpu_memory_gib")
    return {"name": name, "description": data.get("description", ""),
            "gpu_memory_gib": memory,
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
    return CPU_PROFILE


def check_thresholds(values: Any, *, file: str | None, prefix: str) -> None:
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
    check_thresholds(from_inventory, file=file, prefix="all.vars.dsk_thresholds")
    thresholds = _merge(thresholds, from_inventory)
    if overrides:
        check_thresholds(overrides, file=None, prefix="thresholds")
        thresholds = _merge(thresholds, overrides)
    return str(name), thresholds
