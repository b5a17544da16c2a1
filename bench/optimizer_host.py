"""Host time of the gradient clip and the AdamW step on FSDP2's sharded (DTensor)
parameters: what the CPU spends issuing them, which the GPU waits for when the step
reads a value back (the old clip did) or when the CPU falls behind.

    python bench/optimizer_host.py --config trainer/configs/small.toml --steps 20

The model has the config's layers, experts and MTP, so the same parameter tensors, with
every width cut to a few elements: the kernels cost next to nothing and what is timed is
dispatch. One rank, gloo, on the CPU; FSDP2 (fully_shard, as the trainer applies it)
makes every parameter a DTensor. Variants, each timed over the same gradients:

- torch: torch.optim.AdamW (its default multi-tensor step through DTensor) after a
  clip that reads the coefficient on the host and scales each DTensor gradient (the
  trainer before this change);
- torch fused: torch.optim.AdamW(fused=True) through DTensor, after the same clip;
- trainer: trainer.adamw.AdamW on the local tensors, the clip handing it the scale
  (trainer.parallel.clip_grad_norm, as the trainer runs now).

Prints the median milliseconds per step of each, and writes them as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tiny_widths(cfg) -> None:
    m = cfg.model
    m.vocab_size, m.dim, m.inter_dim, m.moe_inter_dim = 64, 32, 64, 16
    m.kv_lora_rank, m.q_lora_rank = 16, 16 if m.q_lora_rank else 0
    m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.n_heads = 8, 8, 8, 2


def old_clip(params, max_norm: float):
    """The clip the trainer ran on DTensor gradients before: the coefficient read on the
    host, then one DTensor multiply per gradient."""
    import torch

    grads = [p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads, 2.0).full_tensor()
    scale = float((max_norm / (norm + 1e-6)).clamp(max=1.0))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "trainer/configs/small.toml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from trainer.adamw import AdamW
    from trainer.config import load_config
    from trainer.model import Transformer
    from trainer.parallel import ParallelDims, clip_grad_norm
    from trainer.parallel.apply import apply_fsdp

    cfg = load_config(args.config)
    tiny_widths(cfg)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        apply_fsdp(model, ParallelDims(1, -1, 1, 1, 1, 1), "cpu", cfg.parallel)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [torch.randn_like(p) for p in params]  # DTensors of each layout
        t = cfg.training

        def groups():
            return [{"params": [p for p in params if p.ndim >= 2],
                     "weight_decay": t.weight_decay},
                    {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

        hyper = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        variants = {
            "torch": (torch.optim.AdamW(groups(), **hyper),
                      lambda opt: old_clip(params, 1e-3)),
            "torch fused": (torch.optim.AdamW(groups(), fused=True, **hyper),
                            lambda opt: old_clip(params, 1e-3)),
            "trainer": (AdamW(groups(), **hyper),
                        lambda opt: clip_grad_norm(params, 1e-3, fused_optimizer=opt)),
        }
        result = {"config": str(args.config), "tensors": len(params), "steps": args.steps,
                  "torch": torch.__version__, "ms": {}}
        for name, (opt, clip) in variants.items():
            times = []
            for _ in range(args.steps + 2):
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
                start = time.perf_counter()
                clip(opt)
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            result["ms"][name] = statistics.median(times[2:]) * 1e3
            print(f"{name:>12}: {result['ms'][name]:7.2f} ms per step "
                  f"({len(params)} parameter tensors)")
    finally:
        dist.destroy_process_group()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
