"""Per-device compute: matmul TFLOP/s and device-memory copy bandwidth.

Run on a node, directly or under torchrun (each node's local rank 0 measures every local
device in turn; other local ranks only wait):

    python -m trainer.probes.gpu_perf [--size 8192] [--copy-mib 4096] [--iters 20]
        [--warmup 5] [--json-out FILE]

On CUDA: an N x N x N bf16 matmul (2 N^3 flops) timed with CUDA events after a warm-up,
and a copy of a buffer of --copy-mib MiB into another, counted as read + write
(2 x bytes per copy), the way memory bandwidth figures are quoted. Without CUDA the same
two measurements run on the CPU (with smaller defaults), so a CPU-only cluster exercises
the same path; its thresholds are in the cpu-sandbox profile. The matmul runs in the
dtype the trainer computes in on that device (training.dtype "auto",
trainer.config.uses_bf16): bf16 on a GPU, float32 on a CPU, where bf16 runs at whatever
the CPU's vector units make of it (on a 2-core AVX2 machine without bf16 instructions:
about 1.4 GFLOP/s, against 120-150 in fp32).

This module needs only torch and the trainer package: the nodes have those, not dsk_provision.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch

from trainer.config import uses_bf16
from trainer.probes import write_json_whole

CUDA_DEFAULTS = {"size": 8192, "copy_mib": 4096}
CPU_DEFAULTS = {"size": 512, "copy_mib": 64}


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of fn, averaged over iters after warmup calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - began) / iters


def matmul_dtype(device: torch.device) -> torch.dtype:
    """What the trainer computes in on ``device`` with training.dtype "auto"."""
    return torch.bfloat16 if uses_bf16("auto", device.type) else torch.float32


def matmul_tflops(device: torch.device, size: int, warmup: int, iters: int,
                  dtype: torch.dtype = torch.bfloat16) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _timed(lambda: torch.matmul(a, b, out=out), device, warmup, iters)
    return 2 * size**3 / seconds / 1e12


def copy_gbs(device: torch.device, mib: int, warmup: int, iters: int) -> float:
    """Read + write bandwidth of a device-to-device copy, GB/s (1e9 bytes)."""
    count = mib * (1 << 20) // 4
    src = torch.ones(count, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, warmup, iters)
    if not torch.equal(dst[:1024], src[:1024]):
        raise RuntimeError(f"the copy on {device} produced wrong values")
    return 2 * count * 4 / seconds / 1e9


def measure(size: int | None = None, copy_mib: int | None = None, warmup: int = 5,
            iters: int = 20) -> dict:
    """Every local CUDA device, or the CPU when there is none."""
    if torch.cuda.is_available():
        defaults = CUDA_DEFAULTS
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        defaults = CPU_DEFAULTS
        devices = [torch.device("cpu")]
    size = size or defaults["size"]
    copy_mib = copy_mib or defaults["copy_mib"]
    dtype = matmul_dtype(devices[0])  # the devices are all of one type
    rows = []
    for device in devices:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            name = torch.cuda.get_device_name(device)
        else:
            name = f"CPU ({torch.get_num_threads()} threads)"
        rows.append({
            "index": device.index if device.index is not None else 0,
            "name": name,
            "matmul_tflops": matmul_tflops(device, size, warmup, iters, dtype),
            "copy_gbs": copy_gbs(device, copy_mib, warmup, iters),
        })
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "host": socket.gethostname(),
        "device": devices[0].type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul": {"size": size, "dtype": str(dtype).removeprefix("torch."),
                   "flops": 2 * size**3},
        "copy_bytes": copy_mib * (1 << 20),
        "warmup": warmup,
        "iters": iters,
        "devices": rows,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.probes.gpu_perf",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, help="matmul N (default 8192 on CUDA, 512 on CPU)")
    parser.add_argument("--copy-mib", type=int,
                        help="copy buffer in MiB (default 4096 on CUDA, 64 on CPU)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per measurement")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--json-out", type=Path,
                        help="write the result here (a path on each node: validate runs "
                             "every node in its own directory)")
    args = parser.parse_args(argv)
    for name in ("size", "copy_mib"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.iters < 1:
        parser.error("need --warmup >= 0 and --iters >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Under torchrun with several processes per node, one of them measures for the node.
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    result = measure(args.size, args.copy_mib, args.warmup, args.iters)
    for row in result["devices"]:
        print(f"{result['host']} {result['device']}:{row['index']} {row['name']}: "
              f"matmul {row['matmul_tflops']:.2f} TFLOP/s, copy {row['copy_gbs']:.1f} GB/s",
              flush=True)
    if args.json_out:
        write_json_whole(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
