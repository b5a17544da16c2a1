"""Where one training step's GPU time goes: the trainer's model, optimizer and bf16
autocast on one GPU, profiled with torch.profiler.

    python -m trainer.bench.step_profile --config trainer/configs/small.toml \
        [--micro-batch 4] [--compile] [--fp8 tensorwise] [--fp8-experts rowwise] \
        [--top 30] [--json out.json]

Prints the step time, the share of it the GPU was busy (kernel time over wall time),
where it sat idle (the gaps between kernels by length, the longest with the step phase
they began in), and the kernels by total time, grouped into families (GEMM, attention,
elementwise, reductions, copies, ...), so that an optimisation can be aimed at what
dominates.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trainer.config import load_config
from trainer.model import Transformer
from trainer.optim import build_optimizer
from trainer.parallel.float8 import apply_fp8_options
from trainer.profiling import describe_gaps, idle_gaps, kernel_times
from trainer.step import phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--micro-batch", type=int, help="override training.micro_batch_size")
    parser.add_argument("--seq-len", type=int, help="override training.seq_len")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--no-mtp", action="store_true", help="turn the MTP module off")
    parser.add_argument("--fp8", help="override training.fp8 (a torchao recipe, or off)")
    parser.add_argument("--fp8-experts", help="override training.fp8_experts (rowwise, or off)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up)")
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 1

    cfg = load_config(args.config)
    t = cfg.training
    mbs = args.micro_batch or t.micro_batch_size
    seq = args.seq_len or t.seq_len
    if args.no_mtp:
        cfg.model.mtp_depth = 0
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    margs = cfg.model
    t.fp8 = args.fp8 or t.fp8
    t.fp8_experts = args.fp8_experts or t.fp8_experts
    with device:
        model = Transformer(margs)
    apply_fp8_options(model, t, device)  # as the trainer applies them, one GPU
    if args.compile:
        from trainer.parallel.apply import apply_compile
        apply_compile(model)
    opt, _scheduler = build_optimizer(model, cfg)  # the trainer's own AdamW
    tokens = torch.randint(0, margs.vocab_size, (mbs, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        with phase("forward"), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(inputs, targets)
        with phase("backward"):
            out.loss.backward()
        with phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()

    kernels, by_family, busy_ms = kernel_times(prof, args.steps)
    flops = model.flops_per_token(seq) * mbs * seq
    from trainer.metrics import peak_flops
    peak = peak_flops(device)
    mfu = flops / step_s / peak if peak else None
    n_kernels = sum(v[1] for v in kernels.values())

    print(f"{torch.cuda.get_device_name(device)} | micro-batch {mbs} x seq {seq} | "
          f"compile {args.compile} | mtp {margs.mtp_depth} | fp8 {t.fp8} | "
          f"fp8 experts {t.fp8_experts}")
    print(f"step {step_s * 1e3:.1f} ms | {mbs * seq / step_s:,.0f} tokens/s | "
          f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
          f"kernel time {busy_ms:.1f} ms ({100 * busy_ms / (step_s * 1e3):.0f}% of the step) | "
          f"{n_kernels:.0f} kernels | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    gaps = idle_gaps(prof.events(), args.steps)
    print(describe_gaps(gaps))
    print("\nby family (ms per step):")
    for fam, ms in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:<20} {ms:8.2f}  {100 * ms / busy_ms:5.1f}%")
    print(f"\ntop {args.top} kernels (ms per step, calls per step):")
    for name, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {ms:8.2f} {n:6.0f}  {name[:150]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"fp8": t.fp8, "fp8_experts": t.fp8_experts,
                       "step_ms": step_s * 1e3, "tokens_per_s": mbs * seq / step_s, "mfu": mfu,
                       "kernel_ms": busy_ms, "by_family": by_family, "idle_gaps": gaps,
                       "kernels": {k: v for k, v in kernels.items()}}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
