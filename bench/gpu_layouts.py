"""Parallel layouts of the trainer on the GPUs of one machine, against a one-GPU run.

Every layout trains the same model on the same global batch (micro-batch x gradient
accumulation x data-parallel degree) for the same steps, so its per-step losses must match
the one-GPU run's within bf16 tolerance; tokens/s per GPU, MFU and peak memory come from
the trainer's own metrics.

    python bench/gpu_layouts.py --config trainer/configs/small.toml --steps 10 \
        --layouts base fsdp2 tp2 ep2 pp2 --out layouts.json

Layouts: base (1 GPU, gradient accumulation 2), fsdp2, ddp2, ep2 (data-parallel, no
accumulation), tp2, pp2 (pipeline 1F1B with 2 micro-batches; gradient accumulation 2),
compile (1 GPU with torch.compile), fsdp2compile, fsdp2bf16 (parameters gathered in bf16),
fsdp2kept (blocks not resharded after forward), fsdp2prefetch2 (two blocks gathered
ahead). MTP is turned off in every layout,
since tp and pp do not combine with it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import gpu_fp8  # the bench beside this one: how a config with overrides is written

REPO = Path(__file__).resolve().parent.parent

# layout -> (GPUs, overrides); the global batch is 2 micro-batches in every layout.
LAYOUTS: dict[str, tuple[int, dict]] = {
    "base": (1, {"training.grad_accum_steps": 2}),
    "compile": (1, {"training.grad_accum_steps": 2, "training.compile": True}),
    "fsdp2": (2, {"parallel.dp_shard": 2}),
    "fsdp2compile": (2, {"parallel.dp_shard": 2, "training.compile": True}),
    "fsdp2bf16": (2, {"parallel.dp_shard": 2, "parallel.fsdp_param_dtype": "bfloat16"}),
    "fsdp2kept": (2, {"parallel.dp_shard": 2, "parallel.fsdp_reshard_after_forward": False}),
    "fsdp2prefetch2": (2, {"parallel.dp_shard": 2, "parallel.fsdp_prefetch": 2}),
    "ddp2": (2, {"parallel.dp_replicate": 2, "parallel.dp_shard": 1}),
    "ep2": (2, {"parallel.dp_shard": 2, "parallel.ep": 2}),
    "tp2": (2, {"parallel.dp_shard": 1, "parallel.tp": 2, "training.grad_accum_steps": 2}),
    "pp2": (2, {"parallel.dp_shard": 1, "parallel.pp": 2, "parallel.pp_schedule": "1f1b",
                "parallel.pp_microbatches": 2, "training.grad_accum_steps": 2}),
}


# every layout starts from these, then applies its own overrides: a micro-batch that fits
# every layout on one GPU's share, eager unless the layout compiles
COMMON = {"training.micro_batch_size": 4, "training.compile": False}


def write_config(base: dict, overrides: dict, path: Path) -> None:
    """The config of one layout: MTP off and COMMON, then the layout's overrides."""
    gpu_fp8.write_config(base, {"model.mtp_depth": 0, **COMMON, **overrides}, path)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from /proc (children before grandchildren)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_layout(name: str, base: dict, steps: int, work: Path, timeout: float) -> dict:
    gpus, overrides = LAYOUTS[name]
    cfg = work / f"{name}.toml"
    write_config(base, overrides, cfg)
    out = work / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", "-m", "trainer.train", "--config", str(cfg),
           "--steps", str(steps), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONFAULTHANDLER="1")
    started = time.monotonic()
    # a layout that hangs is stopped with all its workers (torchrun starts them in their
    # own sessions): SIGABRT first, so that each worker's faulthandler prints where it
    # was stuck, then SIGKILL to whatever is left
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = descendants(proc.pid)
        for pid in tree:
            _signal(pid, signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *tree]:
                _signal(pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        return {"layout": name, "gpus": gpus, "ok": False, "wall_s": round(timeout),
                "error": f"timed out after {timeout:.0f} s:\n" + (stdout + stderr)[-12000:]}
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        tail = (stdout + stderr)[-3000:]
        return {"layout": name, "gpus": gpus, "ok": False, "error": tail, "wall_s": elapsed}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"layout": name, "gpus": gpus, "ok": True, "wall_s": round(elapsed, 1),
            "losses": [m["loss"] for m in metrics],
            "tokens_per_s": summary.get("tokens_per_s"),
            "tokens_per_s_per_gpu": (summary.get("tokens_per_s") or 0) / gpus,
            "mfu": summary.get("mfu"),
            "peak_mem_gib": max((m.get("peak_mem_gib") or 0) for m in metrics)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "trainer/configs/small.toml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layouts", nargs="+", default=["base", "fsdp2", "tp2", "ep2", "pp2"],
                        choices=sorted(LAYOUTS))
    parser.add_argument("--out", type=Path, default=Path("layouts.json"))
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds a layout may take before it is stopped (default 300)")
    args = parser.parse_args()

    base = tomllib.loads(args.config.read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsk-layouts-") as tmp:
        for name in args.layouts:
            row = run_layout(name, base, args.steps, Path(tmp), args.timeout)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            args.out.write_text(json.dumps({"config": str(args.config), "steps": args.steps,
                                            "rows": rows}, indent=2) + "\n")

    ref = next((r for r in rows if r["layout"] == "base" and r["ok"]), None)
    print("| layout | GPUs | final loss | max abs diff vs base | tokens/s per GPU | MFU "
          "| peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if not r["ok"]:
            print(f"| {r['layout']} | {r['gpus']} | failed | | | | |")
            continue
        diff = "-"
        if ref and r is not ref:
            diff = f"{max(abs(a - b) for a, b in zip(r['losses'], ref['losses'], strict=True)):.4f}"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['layout']} | {r['gpus']} | {r['losses'][-1]:.4f} | {diff} "
              f"| {r['tokens_per_s_per_gpu']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
