"""bf16 against FP8 for the wide config's matmuls alone, forward + backward, compiled:
the routed experts (GroupedExperts against float8.Float8GroupedExperts) and dense linears
(nn.Linear against torchao Float8Linear, tensorwise and rowwise). Median of CUDA-event
timings after warm-up.

    python bench/fp8_kernels.py --out fp8_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bench(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def experts_case(tokens: int, topk: int, n_experts: int, dim: int, hidden: int) -> dict:
    from trainer.model.model import GroupedExperts
    from trainer.parallel.float8 import Float8GroupedExperts

    torch.manual_seed(0)
    slots = tokens * topk
    # random group sizes in multiples of 16 rows: the bf16 grouped GEMM's compiled
    # backward asserts on unaligned groups outside the model's own layout
    choice = torch.randint(0, n_experts, (slots // 16,), device="cuda")
    counts = 16 * torch.bincount(choice, minlength=n_experts)
    x = torch.randn(slots, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    row = {"case": f"experts {n_experts}x({dim}->{hidden}), {slots} slots"}
    for name, cls in (("bf16", GroupedExperts), ("fp8 rowwise", Float8GroupedExperts)):
        module = GroupedExperts(n_experts, dim, hidden).cuda()
        for w in (module.w1, module.w2, module.w3):
            torch.nn.init.normal_(w, std=0.02)
        module.__class__ = cls
        step = torch.compile(lambda m=module: m(x, counts).sum().backward())

        def run(step=step):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step()
        row[name] = bench(run)
    flops = 6 * slots * dim * hidden * 3
    row["bf16_tflops"] = flops / row["bf16"] / 1e9
    return row


def linear_case(tokens: int, din: int, dout: int) -> dict:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    x = torch.randn(tokens, din, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    row = {"case": f"linear {din}->{dout}, {tokens} tokens"}
    for name in ("bf16", "tensorwise", "rowwise"):
        module = torch.nn.Sequential(torch.nn.Linear(din, dout, bias=False)).cuda()
        if name != "bf16":
            convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name(name))
        step = torch.compile(lambda m=module: m(x).sum().backward())

        def run(step=step):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step()
        row[name] = bench(run)
    row["bf16_tflops"] = 6 * tokens * din * dout / row["bf16"] / 1e9
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fp8_kernels.json"))
    args = parser.parse_args()
    rows = []
    cases = [lambda: experts_case(16384, 6, 64, 2048, 1408),
             lambda: experts_case(65536, 6, 48, 1024, 512),
             lambda: linear_case(16384, 2048, 10944),
             lambda: linear_case(16384, 2048, 3072),
             lambda: linear_case(16384, 2048, 2816),
             lambda: linear_case(65536, 1024, 4096),
             lambda: linear_case(16384, 4096, 14336)]
    for case in cases:
        try:
            row = case()
        except Exception as exc:  # one failing case leaves the others measured
            row = {"case": "failed", "error": repr(exc)[:2000]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
