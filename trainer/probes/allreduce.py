"""All-reduce bandwidth and correctness, in the manner of nccl-tests' all_reduce_perf.

Run under torchrun on every node:

    python -m trainer.probes.allreduce --begin 1K --end 16M --factor 2 \
        --warmup 5 --iters 20 [--dtype float32] [--api auto] [--json-out FILE]

NCCL when CUDA is available, gloo otherwise. For each size the all-reduce (sum) is timed
out of place and in place; bandwidths follow nccl-tests (doc/PERFORMANCE.md there):

    algbw = bytes / time
    busbw = algbw * 2 * (n - 1) / n        (n = number of ranks)

`--api` says what runs the collective. `libnccl` calls NCCL's ncclAllReduce directly
(trainer/probes/libnccl.py, a communicator of its own) as nccl-tests does: out of place
into a separate receive buffer, in place on one buffer, on the current CUDA stream.
`torch` calls `torch.distributed.all_reduce`, which only works in place, so "out of
place" copies the send buffer into the receive buffer and reduces that: what a framework
pays when it must keep its input, plus ProcessGroupNCCL's per-call bookkeeping. `auto`
(the default) takes libnccl on GPUs when every rank can load it, torch otherwise, and the
results say which ran and why. The time of one operation is averaged over the iterations
and then over the ranks (nccl-tests' default `-a 1`).

Correctness: every rank fills a known pattern, one more all-reduce runs on fresh buffers
and every element is compared with the expected sum; `#wrong` is the number of wrong
elements summed over all ranks (out of place, a changed send buffer counts too).

This module must only need torch: the nodes have the trainer package, not dsk_provision.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.probes import libnccl, write_json_whole

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int32": torch.int32,
}
# nccl-tests' short type names, for the table.
_TYPE_NAMES = {
    "float32": "float",
    "float16": "half",
    "bfloat16": "bfloat16",
    "float64": "double",
    "int32": "int32",
}
# Pattern values are (index + rank) % _PATTERN_PERIOD: small integers, so every partial sum
# is exact even in bfloat16 for up to 85 ranks (3 * 85 < 256).
_PATTERN_PERIOD = 4
# What runs the collective (--api), as the results name it.
API_LIBNCCL = "libnccl"
API_TORCH = "torch.distributed"


def parse_size(text: str) -> int:
    """'1K' -> 1024, '16M' -> 16777216, '512' -> 512 (bytes, powers of 1024 as nccl-tests)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGB]?)\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512, 1K, 16M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def sizes(begin: int, end: int, factor: int) -> list[int]:
    """Sizes from begin to end (inclusive), each `factor` times the previous one."""
    if begin <= 0 or end < begin:
        raise ValueError(f"need 0 < begin <= end, got begin={begin} end={end}")
    if factor < 2:
        raise ValueError(f"factor must be at least 2, got {factor}")
    out = []
    size = begin
    while size <= end:
        out.append(size)
        size *= factor
    return out


def algbw_gbs(size_bytes: int, seconds: float) -> float:
    """Algorithm bandwidth in GB/s (10^9 bytes per second), as nccl-tests prints it."""
    return size_bytes / seconds / 1e9 if seconds > 0 else 0.0


def busbw_factor(world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth factor: 2 (n - 1) / n."""
    return 2.0 * (world_size - 1) / world_size


def busbw_gbs(size_bytes: int, seconds: float, world_size: int) -> float:
    return algbw_gbs(size_bytes, seconds) * busbw_factor(world_size)


def _pattern_values(rank: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One period of rank `rank`'s pattern: element i holds (i + rank) % P."""
    return torch.tensor([(k + rank) % _PATTERN_PERIOD for k in range(_PATTERN_PERIOD)],
                        dtype=dtype, device=device)


def _sum_values(world_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One period of the expected sum over ranks."""
    return torch.tensor(
        [sum((k + r) % _PATTERN_PERIOD for r in range(world_size)) for k in range(_PATTERN_PERIOD)],
        dtype=dtype, device=device)


# Buffers are filled and compared one period at a time through a (-1, P) view, so a
# multi-GB buffer needs no index tensor or expected copy beside it.
def _fill_periodic(buf: torch.Tensor, values: torch.Tensor) -> None:
    full = buf.numel() // _PATTERN_PERIOD * _PATTERN_PERIOD
    if full:
        buf[:full].view(-1, _PATTERN_PERIOD).copy_(values.expand(full // _PATTERN_PERIOD, -1))
    if buf.numel() > full:
        buf[full:].copy_(values[: buf.numel() - full])


def _count_wrong_periodic(buf: torch.Tensor, values: torch.Tensor) -> int:
    full = buf.numel() // _PATTERN_PERIOD * _PATTERN_PERIOD
    wrong = 0
    if full:
        wrong += int((buf[:full].view(-1, _PATTERN_PERIOD) != values).sum().item())
    if buf.numel() > full:
        wrong += int((buf[full:] != values[: buf.numel() - full]).sum().item())
    return wrong


def fill_pattern(buf: torch.Tensor, rank: int) -> None:
    _fill_periodic(buf, _pattern_values(rank, buf.dtype, buf.device))


def expected_sum(count: int, world_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The all-reduced pattern: sum over ranks r of (i + r) % P."""
    out = torch.empty(count, dtype=dtype, device=device)
    _fill_periodic(out, _sum_values(world_size, dtype, device))
    return out


class _Timer:
    """Wall time of a block of collectives: CUDA events on GPU, barrier + perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.Event(enable_timing=True)
            self.stop = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            dist.barrier()
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.stop.record()
            self.stop.synchronize()
            self.seconds = self.start.elapsed_time(self.stop) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0
        return False


def _time_op(op, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        op()
    with _Timer(device) as timer:
        for _ in range(iters):
            op()
    return timer.seconds / iters


def _mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _sum_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def run_size(size_bytes: int, dtype_name: str, warmup: int, iters: int,
             device: torch.device, comm: libnccl.Communicator | None = None) -> dict | None:
    """Time and check one size; None when the size holds no whole element. With ``comm``
    the all-reduces are ncclAllReduce calls on that communicator, else torch.distributed's."""
    dtype = _DTYPES[dtype_name]
    elem = torch.tensor([], dtype=dtype).element_size()
    count = size_bytes // elem
    if count == 0:
        return None
    nbytes = count * elem
    rank, world = dist.get_rank(), dist.get_world_size()

    send = torch.empty(count, dtype=dtype, device=device)
    recv = torch.empty(count, dtype=dtype, device=device)
    mine = _pattern_values(rank, dtype, device)
    total = _sum_values(world, dtype, device)
    _fill_periodic(send, mine)

    if comm is not None:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        out_of_place = comm.all_reduce_call(send, recv, stream)
        in_place = comm.all_reduce_call(recv, recv, stream)
    else:
        def out_of_place():
            recv.copy_(send)
            dist.all_reduce(recv)

        def in_place():
            dist.all_reduce(recv)

    row = {"size": nbytes, "count": count, "type": _TYPE_NAMES[dtype_name], "redop": "sum",
           "root": -1}
    for mode, op in (("out_of_place", out_of_place), ("in_place", in_place)):
        recv.copy_(send)
        seconds = _mean_over_ranks(_time_op(op, warmup, iters, device), device)
        # Fresh buffers for the check: the timed in-place loop keeps summing into recv.
        _fill_periodic(send, mine)
        if mode == "out_of_place":
            recv.zero_()
            out_of_place()
            wrong = _count_wrong_periodic(recv, total) + _count_wrong_periodic(send, mine)
        else:
            _fill_periodic(recv, mine)
            in_place()
            wrong = _count_wrong_periodic(recv, total)
        row[mode] = {
            "time_us": seconds * 1e6,
            "algbw_gbs": algbw_gbs(nbytes, seconds),
            "busbw_gbs": busbw_gbs(nbytes, seconds, world),
            "wrong": _sum_over_ranks(wrong, device),
        }
    return row


def format_table(result: dict) -> str:
    """A table laid out like nccl-tests' all_reduce_perf output."""
    head = (
        f"# all_reduce: {result['world_size']} ranks, backend {result['backend']}, "
        f"api {result['api']}, dtype {result['dtype']}, warmup {result['warmup']}, "
        f"iters {result['iters']}\n"
        "#" + " " * 59 + "out-of-place" + " " * 23 + "in-place\n"
        f"#{'size':>11} {'count':>12} {'type':>9} {'redop':>6} {'root':>6}"
        f" {'time':>8} {'algbw':>7} {'busbw':>7} {'#wrong':>6}"
        f" {'time':>8} {'algbw':>7} {'busbw':>7} {'#wrong':>6}\n"
        f"#{'(B)':>11} {'(elements)':>12} {'':>9} {'':>6} {'':>6}"
        f" {'(us)':>8} {'(GB/s)':>7} {'(GB/s)':>7} {'':>6}"
        f" {'(us)':>8} {'(GB/s)':>7} {'(GB/s)':>7} {'':>6}\n"
    )
    lines = []
    for row in result["results"]:
        cells = f" {row['size']:>11} {row['count']:>12} {row['type']:>9} {row['redop']:>6}" \
                f" {row['root']:>6}"
        for mode in ("out_of_place", "in_place"):
            m = row[mode]
            cells += f" {m['time_us']:>8.1f} {m['algbw_gbs']:>7.3f} {m['busbw_gbs']:>7.3f}" \
                     f" {m['wrong']:>6}"
        lines.append(cells)
    verdict = "OK" if not result["wrong_total"] else "FAILED"
    tail = (
        f"# Out of bounds values : {result['wrong_total']} {verdict}\n"
        f"# Avg bus bandwidth    : {result['avg_busbw_gbs']:.3f}\n"
    )
    return head + "\n".join(lines) + "\n#\n" + tail


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.probes.allreduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--begin", default="1K", help="smallest size in bytes (1K, 16M, ...)")
    parser.add_argument("--end", default="16M", help="largest size in bytes")
    parser.add_argument("--factor", type=int, default=2, help="multiply the size by this")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per size")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per size")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--api", default="auto", choices=("auto", "libnccl", "torch"),
                        help="ncclAllReduce called directly, torch.distributed.all_reduce, or "
                             "libnccl where every rank can load it (auto)")
    parser.add_argument("--json-out", type=Path, help="rank 0 writes the results here")
    args = parser.parse_args(argv)
    try:
        args.sizes = sizes(parse_size(args.begin), parse_size(args.end), args.factor)
    except ValueError as exc:
        parser.error(str(exc))
    if args.warmup < 0 or args.iters < 1:
        parser.error("need --warmup >= 0 and --iters >= 1")
    return args


def open_communicator(api: str, backend: str, device: torch.device,
                      library_path: str | None = None):
    """(communicator or None, the api that runs, why auto did not take libnccl or None).

    Every rank must call this: the ranks agree on whether all of them loaded NCCL before
    any joins a communicator, so that one node without the library cannot leave the others
    waiting in ncclCommInitRank."""
    if api == "torch":
        return None, API_TORCH, None
    if backend != "nccl":
        if api == "libnccl":
            raise SystemExit("--api libnccl needs CUDA GPUs (this run uses gloo)")
        return None, API_TORCH, "no CUDA GPU: gloo through torch.distributed"
    try:
        library, why = libnccl.Library(library_path), None
    except libnccl.NcclUnavailable as exc:
        library, why = None, str(exc)
    flag = torch.tensor([0 if library is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        if api == "libnccl":
            raise SystemExit(f"--api libnccl: {why or 'another rank could not load NCCL'}")
        return None, API_TORCH, f"libnccl not loaded on every rank ({why or 'another rank'})"
    uid = torch.zeros(libnccl.UNIQUE_ID_BYTES, dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        uid.copy_(torch.frombuffer(bytearray(library.unique_id()), dtype=torch.uint8))
    dist.broadcast(uid, 0)
    comm = library.communicator(dist.get_world_size(), bytes(uid.cpu().tolist()),
                                dist.get_rank())
    return comm, API_LIBNCCL, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        backend = "nccl"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # Binding the device up front lets NCCL set up eagerly and barrier() know its GPU.
        dist.init_process_group(backend=backend, device_id=device)
    else:
        backend = "gloo"
        device = torch.device("cpu")
        dist.init_process_group(backend=backend)
    comm = None
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        comm, api, api_note = open_communicator(args.api, backend, device)
        rows = []
        for size in args.sizes:
            row = run_size(size, args.dtype, args.warmup, args.iters, device, comm)
            if row is not None:
                rows.append(row)
        wrong_total = sum(r[m]["wrong"] for r in rows for m in ("out_of_place", "in_place"))
        busbws = [r[m]["busbw_gbs"] for r in rows for m in ("out_of_place", "in_place")]
        result = {
            "benchmark": "all_reduce",
            "backend": backend,
            "world_size": world,
            "dtype": args.dtype,
            "warmup": args.warmup,
            "iters": args.iters,
            "busbw_factor": busbw_factor(world),
            "torch": torch.__version__,
            "api": api,
            "api_note": api_note,
            # The NCCL that ran the timed all-reduces.
            "nccl": (comm.library.version if comm is not None
                     else ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl"
                     else None),
            "results": rows,
            "wrong_total": wrong_total,
            "avg_busbw_gbs": sum(busbws) / len(busbws) if busbws else 0.0,
        }
        if rank == 0:
            sys.stdout.write(format_table(result))
            sys.stdout.flush()
            if args.json_out:
                write_json_whole(args.json_out, result)
        dist.barrier()
    finally:
        if comm is not None:
            comm.close()
        dist.destroy_process_group()
    return 1 if wrong_total else 0


if __name__ == "__main__":
    sys.exit(main())
