"""AdamW's step over a config's parameters, one GPU: torch's fused AdamW against
trainer.adamw.AdamW (the Triton update the trainer builds), each without and with a
``grad_scale`` (how the trainer's gradient clip hands over its coefficient). Median of
CUDA-event timings after warm-up (bench.fp8_kernels.bench).

    python bench/adamw.py --config wide [--iters 20] [--out adamw.json]

The model is built on the GPU and its optimizer by trainer.optim.build_optimizer (torch's
fused AdamW gets the same parameter groups), the gradients random. Bandwidth counts 28
bytes per fp32 parameter (parameter, gradient and both moments read, parameter and
moments written). Without a CUDA GPU the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fp8_kernels import bench  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

BYTES_PER_PARAM = 28


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="wide", help="a name in trainer/configs or a path")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per case")
    parser.add_argument("--out", type=Path, help="write the figures here too (JSON)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    path = Path(args.config)
    if path.suffix != ".toml":
        path = REPO / "trainer" / "configs" / f"{args.config}.toml"
    cfg = load_config(path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg.model)
    ours, _scheduler = build_optimizer(model, cfg)  # trainer.adamw.AdamW on a GPU
    theirs = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in ours.param_groups],
        lr=cfg.training.lr, betas=(cfg.training.beta1, cfg.training.beta2),
        eps=cfg.training.eps, fused=True)
    params = [p for g in ours.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    optimizers = {"torch fused": theirs, "trainer.adamw": ours}
    rows = []
    for name, opt in optimizers.items():
        for scaled in (False, True):
            opt.grad_scale = torch.tensor(1.5, device="cuda") if scaled else None
            ms = bench(opt.step, iters=args.iters)
            rows.append({"optimizer": name, "grad_scale": scaled, "ms": ms,
                         "tb_s": n * BYTES_PER_PARAM / ms / 1e9})
            print(f"{name:<24} {'with' if scaled else 'without'} grad_scale: {ms:7.2f} ms "
                  f"({rows[-1]['tb_s']:.2f} TB/s)", flush=True)
    print(f"{n / 1e9:.2f}B parameters, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.out:
        args.out.write_text(json.dumps({"config": str(path), "params": n, "rows": rows,
                                        "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
