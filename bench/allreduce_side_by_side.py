"""All-reduce on this machine's GPUs: nccl-tests' all_reduce_perf beside the project's probe,
the probe once through ncclAllReduce (libnccl) and once through torch.distributed, the
same sizes, warm-up and iterations, one after the other in one run.

    python bench/allreduce_side_by_side.py --begin 1M --end 1G --out allreduce.json

all_reduce_perf is the one the nccl_tests role installs (its install directory and
version from roles/nccl_tests/defaults, as `dsk-provision validate` finds it), or
--all-reduce-perf PATH; it runs with exactly the arguments validate gives it. The probe
runs under torchrun with one process per GPU (gloo on a machine without one, where
nccl-tests cannot run and its columns stay empty). Prints a Markdown table of busbw per
size and mode with each probe's ratio to nccl-tests (the lower of out of place and in
place), and writes the three raw results as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsk_provision.validation import probes  # noqa: E402
from dsk_provision.validation.parsers import parse_nccl_tests  # noqa: E402
from dsk_provision.validation.report import busbw_by_size as busbw  # noqa: E402
from dsk_provision.validation.report import ratios_to  # noqa: E402

APIS = ("libnccl", "torch")
MODES = ("out_of_place", "in_place")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_nccl_tests(path: str | None, gpus: int, args) -> dict:
    """all_reduce_perf's parsed table, or {"skipped": why}."""
    if not gpus:
        return {"skipped": "no CUDA GPU"}
    node = SimpleNamespace(vars={}, gpus=gpus, name="local")
    command = probes.nccl_tests_command(node, args.begin, args.end, args.factor, args.warmup,
                                        args.iters, path=path)
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          timeout=args.timeout)
    if "not installed" in proc.stdout and proc.returncode != 0:
        where = path or probes.nccl_tests_path(node)
        return {"skipped": f"all_reduce_perf not installed ({where})"}
    parsed = parse_nccl_tests(proc.stdout)
    if proc.returncode != 0 or not parsed["results"]:
        raise SystemExit(f"all_reduce_perf exited {proc.returncode}:\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-2000:]}")
    parsed["command"] = command
    return parsed


def run_probe(api: str, nproc: int, args) -> dict:
    """The probe under torchrun on this machine; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "allreduce.json"
        flags = probes.allreduce_args(args.begin, args.end, args.factor, args.warmup, args.iters)
        flags[flags.index("--json-out") + 1] = str(out)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", probes.ALLREDUCE_PROBE, *flags,
                   "--api", api]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=args.timeout)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"the probe (--api {api}) exited {proc.returncode}:\n"
                             f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def table(nccl: dict, ours: dict[str, dict]) -> str:
    """busbw per size (GB/s): nccl-tests out/in, then per probe out/in and its ratio."""
    header = ["size (B)", "nccl-tests out", "nccl-tests in"]
    for result in ours.values():
        header += [f"{result['api']} out", f"{result['api']} in", "vs nccl-tests"]
    # per column, {size: value}: busbw in GB/s, or the ratio to nccl-tests
    columns: list[tuple[dict, str]] = [(busbw(nccl, m), "{:.1f}") for m in MODES]
    for result in ours.values():
        columns += [(busbw(result, m), "{:.1f}") for m in MODES]
        columns.append((ratios_to(result, nccl), "{:.0%}"))
    sizes = sorted({size for values, _ in columns for size in values})
    rows = [[str(size)] + [form.format(values[size]) if size in values else "-"
                           for values, form in columns] for size in sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--begin", default="1M")
    parser.add_argument("--end", default="1G")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--all-reduce-perf", help="all_reduce_perf to run instead of the "
                                                  "role's install")
    parser.add_argument("--nproc", type=int, help="probe processes (default: one per GPU, "
                                                  "2 without a GPU)")
    parser.add_argument("--apis", nargs="+", choices=APIS, default=list(APIS))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("allreduce.json"))
    args = parser.parse_args(argv)
    gpus = gpu_count()
    nproc = args.nproc or gpus or 2
    nccl = run_nccl_tests(args.all_reduce_perf, gpus, args)
    ours = {api: run_probe(api if gpus else "torch", nproc, args)
            for api in (args.apis if gpus else ["torch"])}
    args.out.write_text(json.dumps({"gpus": gpus, "nproc": nproc, "nccl_tests": nccl,
                                    "probe": ours}, indent=2) + "\n")
    if "skipped" in nccl:
        print(f"nccl-tests: skipped ({nccl['skipped']})")
    print(table(nccl, ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
