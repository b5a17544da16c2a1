"""Per-step training metrics: throughput, MFU, memory; the console line and JSON lines."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak per GPU in TFLOP/s (no sparsity), from the vendor data
# sheets. Matched against torch.cuda.get_device_name in order: longer names first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
]


def peak_flops(device: torch.device) -> float | None:
    """bf16 peak FLOP/s of one device, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the CPU resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_line(m: dict[str, Any], total_steps: int) -> str:
    mfu = "-" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
    return (f"step {m['step']}/{total_steps} | loss {m['loss']:.4f} | "
            f"tok/s {m['tokens_per_s']:,.0f} | mfu {mfu} | mem {m['peak_mem_gib']:.1f} GiB")


class MetricsWriter:
    """Appends one JSON object per step to <out>/metrics.jsonl (rank 0 only)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "metrics.jsonl"

    def write(self, m: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
