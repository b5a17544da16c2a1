"""bf16 against FP8 training (training.fp8) on one GPU, config by config, same seed.

Each run is `python -m trainer.train` on a copy of the config with `training.fp8` set
(and any `--set` overrides), one after another in this process's GPU. tokens/s, MFU and
peak memory come from the trainer's metrics.jsonl; tokens/s and MFU are means over the
steps after `--skip` (compilation and warm-up), MFU against the GPU's dense bf16 peak
whatever the recipe. The loss is the last step's.

    python bench/gpu_fp8.py --runs small:off small:tensorwise wide:off wide:tensorwise \
        --steps 200 --out fp8.json

A run name is CONFIG[:RECIPE[:EXPERTS]], CONFIG a file under trainer/configs/ without
.toml (or a path), RECIPE `training.fp8` (off, the default, or a torchao recipe:
tensorwise, rowwise, rowwise_with_gw_hp), EXPERTS `training.fp8_experts` (off, the
default, or rowwise). Each run's whole output is kept beside --out, as OUT-N.log for the
N-th run; "vs bf16" compares with the config's run that has both off.

    python bench/gpu_fp8.py --runs wide wide:off:rowwise wide:tensorwise:rowwise \
        --steps 30 --skip 8 --out wide_fp8x.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def write_config(base: dict, overrides: dict, path: Path) -> None:
    doc = {section: dict(values) for section, values in base.items()}
    doc.setdefault("checkpoint", {})["interval"] = 0
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        doc.setdefault(section, {})[key] = value
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def config_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix == ".toml" else REPO / "trainer" / "configs" / f"{name}.toml"


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_one(spec: str, overrides: dict, steps: int, skip: int, work: Path,
            timeout: float, log: Path | None = None) -> dict:
    """Train one run (``CONFIG[:RECIPE[:EXPERTS]]``) and return its figures. ``log``: a
    file that keeps the trainer's whole output (stdout, then stderr), whatever the end."""
    name, recipe, experts = (spec.split(":") + ["off", "off"])[:3]
    label = f"{Path(name).stem}-{recipe}-{experts}"
    base = tomllib.loads(config_path(name).read_text())
    cfg = work / f"{label}.toml"
    write_config(base, {**overrides, "training.fp8": recipe, "training.fp8_experts": experts},
                 cfg)
    out = work / label
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(cfg), "--steps", str(steps),
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    row = {"run": spec, "config": name, "fp8": recipe, "fp8_experts": experts,
           "overrides": overrides, "steps": steps}
    if log is not None:
        row["log"] = str(log)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        if log is not None:
            log.write_text(_text(exc.stdout) + _text(exc.stderr))
        return {**row, "ok": False,
                "error": f"timed out after {timeout:.0f} s\n{_text(exc.stdout)[-3000:]}"}
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    row["wall_s"] = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        return {**row, "ok": False, "error": (proc.stdout + proc.stderr)[-4000:]}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[skip:] or metrics
    mean = lambda key: sum(m[key] for m in timed) / len(timed)  # noqa: E731
    return {**row, "ok": True, "header": proc.stdout.splitlines()[0],
            "tokens_per_s": mean("tokens_per_s"),
            "mfu": mean("mfu") if all(m["mfu"] is not None for m in timed) else None,
            "step_time_s": mean("step_time_s"),
            "peak_mem_gib": max(m["peak_mem_gib"] or 0 for m in metrics),
            "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
            "losses": [m["loss"] for m in metrics]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True,
                        help="CONFIG[:RECIPE[:EXPERTS]] ...")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=5,
                        help="steps left out of the means (compilation, warm-up)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="overrides for every run, e.g. model.n_layers=6")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("fp8.json"))
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)

    import torch

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import torchao
        versions["torchao"] = torchao.__version__
    except ImportError:
        versions["torchao"] = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsk-fp8-") as tmp:
        for spec in args.runs:
            log = args.out.with_name(f"{args.out.stem}-{len(rows) + 1}.log")
            row = run_one(spec, overrides, args.steps, args.skip, Path(tmp), args.timeout,
                          log)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            args.out.write_text(json.dumps({"versions": versions, "steps": args.steps,
                                            "skip": args.skip, "rows": rows}, indent=1) + "\n")

    print(f"versions: {versions}")
    print("| run | tokens/s | MFU (bf16 peak) | peak GiB | loss at last step | vs bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if not r["ok"]:
            print(f"| {r['run']} | failed | | | | |")
            continue
        ref = next((b for b in rows if b["ok"] and b["config"] == r["config"]
                    and b["fp8"] == b["fp8_experts"] == "off"), None)
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} "
              f"| {r['last_loss']:.4f} | {speed} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
