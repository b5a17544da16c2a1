"""bf16 against FP8 for the wide config's matmuls alone, forward + backward, compiled:
the routed experts (GroupedExperts against float8.Float8GroupedExperts) and dense linears
(nn.Linear against torchao Float8Linear, tensorwise and rowwise). Median of CUDA-event
timings after warm-up; torch.compile's caches are reset before each case.

    python bench/fp8_kernels.py --out fp8_kernels.json

With ``--config``, the cases are that config's own linears instead (those
trainer.parallel.float8.linear_filter would convert, one case per distinct width and
producer), each behind the RMSNorm or SwiGLU that makes its input in the model, at the
config's tokens per micro-batch; each row says which modules share the case, how many
there are, and what the conversion saves or costs per step:

    python bench/fp8_kernels.py --config wide --micro-batch 12 --out fp8_linears.json
"""

from __future__ import annotations

import argparse
import functools
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


RECIPES = ("tensorwise", "rowwise")


class Producer(torch.nn.Module):
    """The op that makes a linear's input in the model, so that the compiled FP8 cast
    can fuse into it as it does there: an RMSNorm, or a SwiGLU of two inputs."""

    def __init__(self, kind: str, din: int):
        super().__init__()
        from trainer.model.model import RMSNorm

        self.kind = kind
        self.norm = RMSNorm(din) if kind == "norm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "norm":
            return self.norm(x)
        if self.kind == "swiglu":
            a, b = x.chunk(2, dim=-1)
            return torch.nn.functional.silu(a) * b
        return x


def linear_case(tokens: int, din: int, dout: int, producer: str = "none",
                label: str | None = None, recipes: tuple = RECIPES) -> dict:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch._dynamo.reset()
    width = 2 * din if producer == "swiglu" else din
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    row = {"case": label or f"linear {din}->{dout}, {tokens} tokens"}
    for name in ("bf16", *recipes):
        module = torch.nn.Sequential(Producer(producer, din),
                                     torch.nn.Linear(din, dout, bias=False)).cuda()
        if name != "bf16":
            convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name(name))
        step = torch.compile(lambda m=module: m(x).sum().backward())

        def run(step=step):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step()
        row[name] = bench(run)
    row["bf16_tflops"] = 6 * tokens * din * dout / row["bf16"] / 1e9
    return row


def config_cases(config: str, micro_batch: int | None, recipes: tuple = RECIPES) -> list:
    """One case per distinct (producer, in, out) among the linears of ``config`` that
    trainer.parallel.float8.linear_filter converts, at its tokens per micro-batch."""
    from trainer.config import load_config
    from trainer.model import Transformer
    from trainer.parallel.float8 import linear_filter

    path = Path(config)
    if path.suffix != ".toml":
        path = Path(__file__).resolve().parent.parent / "trainer" / "configs" / f"{config}.toml"
    cfg = load_config(path)
    tokens = (micro_batch or cfg.training.micro_batch_size) * cfg.training.seq_len
    with torch.device("meta"):
        model = Transformer(cfg.model)
    groups: dict[tuple, list[str]] = {}
    for fqn, module in model.named_modules():
        if linear_filter(module, fqn):
            leaf = fqn.rsplit(".", 1)[-1]
            # wkv_b reads kv_norm's output; wo the attention's; w2 the SwiGLU's; the rest
            # (wq, wkv_a, w1, w3; MTP's eh_proj reads two) an RMSNorm
            producer = {"wo": "none", "w2": "swiglu"}.get(leaf, "norm")
            key = (producer, module.in_features, module.out_features)
            groups.setdefault(key, []).append(fqn)

    def case(producer: str, din: int, dout: int, names: list[str]) -> dict:
        leaves = sorted({n.split(".", 2)[-1] for n in names})
        label = f"{', '.join(leaves)}: {din}->{dout} x{len(names)}, {tokens} tokens"
        row = linear_case(tokens, din, dout, producer, label, recipes)
        row["count"] = len(names)
        for recipe in recipes:
            row[f"{recipe}_saves_ms_per_step"] = round(len(names) * (row["bf16"] - row[recipe]), 3)
        return row
    return [functools.partial(case, *key, names) for key, names in groups.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fp8_kernels.json"))
    parser.add_argument("--config", help="measure this config's linears (a name under "
                        "trainer/configs/ or a path) instead of the fixed cases")
    parser.add_argument("--micro-batch", type=int, help="with --config: sequences per "
                        "micro-batch (default: the config's)")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="the torchao recipes measured against bf16, comma-separated")
    args = parser.parse_args()
    recipes = tuple(r for r in args.recipes.split(",") if r)
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)} (known: {', '.join(RECIPES)})")
    rows = []
    fixed = [lambda: experts_case(16384, 6, 64, 2048, 1408),
             lambda: experts_case(65536, 6, 48, 1024, 512),
             lambda: linear_case(16384, 2048, 10944),
             lambda: linear_case(16384, 2048, 3072),
             lambda: linear_case(16384, 2048, 2816),
             lambda: linear_case(65536, 1024, 4096),
             lambda: linear_case(16384, 4096, 14336)]
    cases = config_cases(args.config, args.micro_batch, recipes) if args.config else fixed
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
