"""Per-step training metrics: throughput, MFU, memory; the console line, JSON lines and,
with ``[metrics] tensorboard = true``, TensorBoard scalars."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from trainer.config import InputError

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


TENSORBOARD_DIR = "tensorboard"


def tensorboard_requested(out_dir: Path) -> tuple[bool, str]:
    """``metrics.tensorboard`` and the config file's name, from the resolved config that
    rank 0 writes to <out>/config.json before training starts."""
    try:
        resolved = json.loads((out_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False, ""
    return bool(resolved.get("metrics", {}).get("tensorboard", False)), resolved.get("path", "")


def open_summary_writer(log_dir: Path, config_file: str = "", purge_step: int | None = None):
    """A torch.utils.tensorboard SummaryWriter, or InputError naming metrics.tensorboard
    when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("the tensorboard package is not installed; pip install "
                         "'tensorboard==2.21.0' (or the trainer extra), or set "
                         "metrics.tensorboard = false", file=config_file or None,
                         field="metrics.tensorboard") from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsWriter:
    """Appends one JSON object per step to <out>/metrics.jsonl (rank 0 only) and, when
    TensorBoard is on, writes the step's numeric metrics as scalars to <out>/tensorboard,
    each under its metrics.jsonl key (null values are left out).

    ``tensorboard=None`` takes ``metrics.tensorboard`` from <out>/config.json. A missing
    tensorboard package raises InputError here, before the first step.

    ``resumed_from``: the checkpoint step a resumed run starts after. The steps the earlier
    run logged past it (it went on after its last checkpoint) are dropped from
    metrics.jsonl and from TensorBoard, so each step appears once."""

    def __init__(self, out_dir: Path, tensorboard: bool | None = None, config_file: str = "",
                 resumed_from: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        if tensorboard is None:
            tensorboard, found = tensorboard_requested(out_dir)
            config_file = config_file or found
        if resumed_from is not None:
            self._truncate(resumed_from)
        purge = None if resumed_from is None else resumed_from + 1
        self.tensorboard = (open_summary_writer(out_dir / TENSORBOARD_DIR, config_file, purge)
                            if tensorboard else None)

    def _truncate(self, last_step: int) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, m: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tensorboard is not None:
            step = int(m["step"])
            for key, value in m.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, float(value), step)
            self.tensorboard.flush()  # a killed run keeps every step it logged

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
