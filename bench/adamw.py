"""AdamW's step over a config's parameters, one GPU: torch's fused AdamW against
trainer.adamw.AdamW (the Triton update the trainer builds), with fp32 moments and with
bf16 ones (training.moments_dtype), each without and with a ``grad_scale`` (how the
trainer's gradient clip hands over its coefficient). Median of CUDA-event timings after
warm-up (bench.fp8_kernels.bench).

    python bench/adamw.py --config wide [--iters 20] [--out adamw.json]

The model is built on the GPU and its optimizer by trainer.optim.build_optimizer (torch's
fused AdamW gets the same parameter groups), the gradients random; one optimizer's state
exists at a time. Bandwidth counts 28 bytes per fp32 parameter with fp32 moments
(parameter, gradient and both moments read, parameter and moments written), 20 with bf16
moments. Without a CUDA GPU the script says so and exits 0.
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

# bytes read and written per parameter by one update, by the moments' dtype
BYTES_PER_PARAM = {torch.float32: 28, torch.bfloat16: 20}


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

    def ours(moments: str):
        cfg.training.moments_dtype = moments
        return build_optimizer(model, cfg)[0]  # trainer.adamw.AdamW on a GPU

    def theirs():
        return torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g["weight_decay"]}
             for g in ours("float32").param_groups],
            lr=cfg.training.lr, betas=(cfg.training.beta1, cfg.training.beta2),
            eps=cfg.training.eps, fused=True)

    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    optimizers = {"torch fused": theirs, "trainer.adamw": lambda: ours("float32"),
                  "trainer.adamw, bf16 moments": lambda: ours("bfloat16")}
    rows = []
    for name, build in optimizers.items():
        opt = build()
        for scaled in (False, True):
            opt.grad_scale = torch.tensor(1.5, device="cuda") if scaled else None
            ms = bench(opt.step, iters=args.iters)
            moments = opt.state[params[0]]["exp_avg"].dtype
            rows.append({"optimizer": name, "grad_scale": scaled, "ms": ms,
                         "moments": str(moments).removeprefix("torch."),
                         "tb_s": n * BYTES_PER_PARAM[moments] / ms / 1e9})
            print(f"{name:<28} {'with' if scaled else 'without'} grad_scale: {ms:7.2f} ms "
                  f"({rows[-1]['tb_s']:.2f} TB/s)", flush=True)
        del opt  # its moments go before the next one's are made
    print(f"{n / 1e9:.2f}B parameters, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.out:
        args.out.write_text(json.dumps({"config": str(path), "params": n, "rows": rows,
                                        "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
