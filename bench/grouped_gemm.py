"""The routed experts' bf16 GEMMs at a config's shapes, on one GPU: torch._grouped_mm
against its alternatives, forward + backward, median of CUDA-event timings after warm-up.

    python bench/grouped_gemm.py --config wide --micro-batch 12 --out grouped_gemm.json

Token slots (micro-batch x seq x top-k) are routed to experts as a router would, each
token to top-k distinct experts drawn at random, so group sizes are near balanced and
not multiples of anything (for the compiled whole experts, in runs of 16 slots). Cases:

- ``kernels``: each of the three GEMMs of w1|w3 (and of w2) alone: forward (rows ragged),
  input gradient (rows ragged), weight gradient (the reduction ragged); the grouped GEMM
  on the routed groups, on the same groups padded to multiples of 128 rows, and a batched
  bmm with every expert at the mean group size (the dense rate the grouped GEMM could at
  best reach); weights given transposed (a view, as the model does) or contiguous.
- ``experts``: the whole SwiGLU of the routed experts (trainer.model.GroupedExperts,
  compiled), forward + backward, on the routed groups and on groups padded to multiples
  of 128 (zero rows), compiled with max-autotune (inductor's Triton grouped GEMM
  template against aten's), and a capacity-padded bmm (every expert padded to the
  largest group, rounded up to 128 rows).
- ``fp8``: the three GEMMs of w1|w3 and w2 in bf16 against FP8
  (``torch._scaled_grouped_mm``, e4m3, rowwise scales, with and without fast
  accumulation), on the routed groups padded to multiples of 16 rows (both dtypes on the
  same groups, TFLOP/s counting the padded rows), and the compiled rowwise cast of an
  activation operand: what FP8 routed experts could gain at the config's shapes.
- ``fp8experts``: the whole routed experts, forward + backward, compiled, in bf16
  (GroupedExperts) against FP8 (trainer.model.fp8_experts.Fp8GroupedExperts) on the
  same routed groups (in runs of 16 slots, as for ``experts``), the slowest kernels of
  each (torch.profiler, per forward + backward), and each of the FP8 path's cast kernels
  alone (GB/s counting the bytes each reads and writes once).

    python bench/grouped_gemm.py --config wide --micro-batch 12 --cases fp8 --out fp8gg.json
    python bench/grouped_gemm.py --config wide --micro-batch 12 --cases fp8experts \
        --out fp8experts.json

TFLOP/s count only the routed slots' work (padding is overhead), except in ``fp8``.
Without a CUDA GPU the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.fp8_kernels import bench  # noqa: E402  (CUDA-event median of a callable)


def try_bench(op, *args, **kwargs):
    """bench of op(*args, **kwargs), or the error's text where the kernel refuses the
    layout."""
    try:
        return bench(lambda: op(*args, **kwargs))
    except Exception as exc:
        return repr(exc)[:300]


def rate(flops: float, ms) -> float | None:
    return flops / ms / 1e9 if isinstance(ms, float) else None


def routed_counts(tokens: int, topk: int, n_experts: int, seed: int = 0):
    """Tokens per expert when each token picks top-k distinct experts at random."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    choice = torch.rand(tokens, n_experts, device="cuda", generator=g).topk(topk, dim=-1)[1]
    return torch.bincount(choice.flatten(), minlength=n_experts)


def pad_counts(counts, multiple: int = 128):
    return (counts + multiple - 1) // multiple * multiple


def offsets(counts):
    import torch

    return torch.cumsum(counts, dim=0, dtype=torch.int32)


def kernel_cases(counts, dim: int, hidden: int) -> list[dict]:
    """Forward, input-gradient and weight-gradient GEMMs of w1|w3 (dim -> 2 hidden) and w2
    (hidden -> dim), grouped on routed and on padded groups, and bmm at the mean size."""
    import torch

    torch.manual_seed(0)
    n_experts = counts.numel()
    slots = int(counts.sum())
    padded = pad_counts(counts)
    mean = slots // n_experts
    bf = torch.bfloat16
    rows = []
    for name, k, n in (("w13", dim, 2 * hidden), ("w2", hidden, dim)):
        w = torch.randn(n_experts, n, k, device="cuda", dtype=bf) * 0.02  # (E, out, in)
        w_t = w.transpose(-2, -1)  # (E, in, out) view, as the model passes it
        w_c = w_t.contiguous()
        w_back = w  # (E, out, in): what the input gradient multiplies by
        for label, cnt in (("routed", counts), ("padded128", padded)):
            total = int(cnt.sum())
            offs = offsets(cnt)
            x = torch.randn(total, k, device="cuda", dtype=bf)
            dy = torch.randn(total, n, device="cuda", dtype=bf)
            flops = 2 * slots * k * n
            fwd_t = try_bench(torch._grouped_mm, x, w_t, offs=offs)
            fwd_c = try_bench(torch._grouped_mm, x, w_c, offs=offs)
            dgrad = try_bench(torch._grouped_mm, dy, w_back, offs=offs)
            wgrad = try_bench(torch._grouped_mm, x.t(), dy, offs=offs)
            rows.append({"case": f"grouped {name} {label}", "rows": total,
                         "fwd_wT_ms": fwd_t, "fwd_wcontig_ms": fwd_c, "dgrad_ms": dgrad,
                         "wgrad_ms": wgrad,
                         "tflops": {"fwd_wT": rate(flops, fwd_t),
                                    "fwd_wcontig": rate(flops, fwd_c),
                                    "dgrad": rate(flops, dgrad),
                                    "wgrad": rate(flops, wgrad)}})
        xb = torch.randn(n_experts, mean, k, device="cuda", dtype=bf)
        dyb = torch.randn(n_experts, mean, n, device="cuda", dtype=bf)
        flops = 2 * n_experts * mean * k * n
        fwd = try_bench(torch.bmm, xb, w_t)
        dgrad = try_bench(torch.bmm, dyb, w_back)
        wgrad = try_bench(torch.bmm, xb.transpose(1, 2), dyb)
        rows.append({"case": f"bmm {name} mean group {mean}", "fwd_ms": fwd, "dgrad_ms": dgrad,
                     "wgrad_ms": wgrad,
                     "tflops": {"fwd": rate(flops, fwd), "dgrad": rate(flops, dgrad),
                                "wgrad": rate(flops, wgrad)}})
    return rows


def fp8_operands(w, x, dy) -> dict:
    """For the forward, input-gradient and weight-gradient GEMM of weights ``w`` (E, out,
    in), inputs ``x`` (rows, in) and output gradients ``dy`` (rows, out): the bf16 call
    (op and its operands) and the FP8 operands with their scales, laid out as
    torch._scaled_grouped_mm takes them (A row-major, B column-major, scales float32:
    per row of A and per column of B, per group for the weight gradient)."""
    import torch

    f8 = torch.float8_e4m3fn
    groups, n, k = w.shape
    total = x.size(0)

    def ones(*shape):
        return torch.ones(*shape, device=x.device)

    w8, wt8 = w.to(f8), w.transpose(-2, -1).contiguous().to(f8)
    return {
        "fwd": ((torch._grouped_mm, x, w.transpose(-2, -1)),
                (x.to(f8), w8.transpose(-2, -1), ones(total), ones(groups, n))),
        "dgrad": ((torch._grouped_mm, dy, w),
                  (dy.to(f8), wt8.transpose(-2, -1), ones(total), ones(groups, k))),
        # the weight gradient as (E, out, in), the weights' own layout, in both dtypes
        "wgrad": ((torch._grouped_mm, dy.t(), x),
                  (dy.t().contiguous().to(f8), x.t().contiguous().to(f8).t(),
                   ones(groups * n), ones(groups * k))),
    }


def fp8_cases(counts, dim: int, hidden: int) -> list[dict]:
    """The same three GEMMs of w1|w3 and w2 in bf16 (torch._grouped_mm) and in FP8
    (torch._scaled_grouped_mm: e4m3 operands, float32 rowwise scales, bf16 out), on the
    routed groups padded to multiples of 16 rows (the FP8 kernel's alignment; unaligned
    groups end in a device-side assert that ends the process). Scales are ones: the
    kernel's time does not depend on them. With the compiled rowwise cast of the
    activation operand (amax, scale, cast), the cost the FP8 path adds per GEMM before
    any fusion."""
    import torch

    f8, bf = torch.float8_e4m3fn, torch.bfloat16
    if not hasattr(torch, "_scaled_grouped_mm"):
        return [{"case": "fp8", "error": "torch._scaled_grouped_mm is missing"}]

    @torch.compile
    def rowwise(a):
        scale = a.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0
        return (a.float() / scale).to(f8), scale.squeeze(-1)

    counts = pad_counts(counts, 16)
    offs = offsets(counts)
    groups, total = counts.numel(), int(counts.sum())
    rows = []
    for name, k, n in (("w13", dim, 2 * hidden), ("w2", hidden, dim)):
        torch.manual_seed(0)
        w = torch.randn(groups, n, k, device="cuda", dtype=bf) * 0.02  # (E, out, in)
        x = torch.randn(total, k, device="cuda", dtype=bf)
        dy = torch.randn(total, n, device="cuda", dtype=bf)
        flops = 2 * total * k * n
        row = {"case": f"fp8 {name} padded16", "rows": total}
        for gemm, (bf16_call, (a, b_, sa, sb)) in fp8_operands(w, x, dy).items():
            op, *args = bf16_call
            ms = try_bench(op, *args, offs=offs)
            row[f"{gemm}_bf16_ms"] = ms
            row[f"{gemm}_bf16_tflops"] = rate(flops, ms)
            for fast in (False, True):
                ms8 = try_bench(torch._scaled_grouped_mm, a, b_, sa, sb, offs=offs,
                                out_dtype=bf, use_fast_accum=fast)
                key = f"{gemm}_fp8{'_fast' if fast else ''}"
                row[f"{key}_ms"] = ms8
                row[f"{key}_tflops"] = rate(flops, ms8)
                if isinstance(ms, float) and isinstance(ms8, float):
                    row[f"{key}_speedup"] = ms / ms8
        row["cast_rowwise_x_ms"] = try_bench(rowwise, x)
        row["cast_rowwise_dy_ms"] = try_bench(rowwise, dy)
        rows.append(row)
    return rows


def kernel_table(run, top: int, passes: int = 2) -> dict:
    """The ``top`` kernels of ``run`` by GPU time per pass (torch.profiler over
    ``passes`` passes), and all its kernels' time per pass."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainer.profiling import kernel_times

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            run()
        torch.cuda.synchronize()
    kernels, _families, total = kernel_times(prof, passes)
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"kernel_ms": total, "kernels": [
        {"kernel": name[:100], "ms": ms, "calls": calls} for name, (ms, calls) in ranked]}


def timed_case(rows: list, label: str, fn, flops: float, extra: dict | None = None,
               mode: str | None = None, compile_: bool = True, kernels: int = 0) -> None:
    """Append to ``rows`` the median time of ``fn`` (compiled unless ``compile_`` is
    off) under bf16 autocast, and with ``kernels`` its top kernels; or the error that
    stopped it."""
    import torch

    step = torch.compile(fn, mode=mode) if compile_ else fn

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step()
    try:
        ms = bench(run)
        rows.append({"case": label, "ms": ms, "tflops": flops / ms / 1e9, **(extra or {})})
        if kernels:
            rows[-1].update(kernel_table(run, kernels))
    except Exception as exc:  # one failing variant leaves the others measured
        rows.append({"case": label, "error": repr(exc)[:1500]})
    print(json.dumps(rows[-1]), flush=True)


def fp8_expert_cases(counts, dim: int, hidden: int) -> list[dict]:
    """The routed experts' SwiGLU MLP, forward + backward, compiled: GroupedExperts (bf16)
    against Fp8GroupedExperts (trainer.model.fp8_experts), on the same routed groups
    and fp32 master weights, with each one's 16 slowest kernels in the compiled graph;
    and each of the FP8 path's cast kernels alone."""
    import torch

    from trainer.model import fp8_experts as f8
    from trainer.model.model import GroupedExperts

    torch.manual_seed(0)
    slots = int(counts.sum())
    flops = 6 * slots * dim * hidden * 3
    module = GroupedExperts(counts.numel(), dim, hidden).cuda()
    for w in module.parameters():
        torch.nn.init.normal_(w, std=0.02)
    x = torch.randn(slots, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows = []
    for cls in (GroupedExperts, f8.Fp8GroupedExperts):
        # a module of its own per class, and a fresh compile: torch.compile caches a
        # graph per code object, so one lambda over a module whose class is swapped
        # would time the first class's graph twice
        torch._dynamo.reset()
        each = cls(counts.numel(), dim, hidden).cuda()
        each.load_state_dict(module.state_dict())
        timed_case(rows, cls.__name__, lambda m=each: m(x, counts).sum().backward(), flops,
                   {"rows": slots}, kernels=16)
    h = torch.randn(slots, 2 * hidden, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(slots, hidden, device="cuda", dtype=torch.bfloat16)
    w1, w2, w3 = (w.detach() for w in (module.w1, module.w2, module.w3))
    xd = x.detach()
    offs = offsets(counts)
    w13q, w13_inv = f8.fp8_weight_rows(w1, w3)
    w2q, w2_inv = f8.fp8_weight_rows(w2)
    for label, fn, nbytes in (
            ("cast: tokens", lambda: f8.fp8_rows(xd), xd.numel() * 3),
            ("cast: output gradient, times w2's scales", lambda: f8.fp8_rows(xd, w2_inv, offs),
             xd.numel() * 3),
            ("cast: w1|w3 rows", lambda: f8.fp8_weight_rows(w1, w3), w1.numel() * 10),
            ("w1|w3 e4m3 transposed", lambda: f8.column_major(w13q), w13q.numel() * 2),
            ("cast: w2 rows", lambda: f8.fp8_weight_rows(w2), w2.numel() * 5),
            ("w2 e4m3 transposed", lambda: f8.column_major(w2q), w2q.numel() * 2),
            ("swiglu + cast", lambda: f8.swiglu_fp8(h), h.numel() * 2 + g.numel() * 3),
            ("swiglu backward + cast, times w1|w3's scales",
             lambda: f8.swiglu_backward_fp8(h, g, w13_inv, offs),
             h.numel() * 5 + g.numel() * 2)):
        ms = bench(fn)
        rows.append({"case": label, "ms": ms, "GB/s": nbytes / ms / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def expert_cases(counts, dim: int, hidden: int, compile_: bool = True) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from trainer.model.model import GroupedExperts

    torch.manual_seed(0)
    n_experts = counts.numel()
    slots = int(counts.sum())
    flops = 6 * slots * dim * hidden * 3  # forward + backward of three GEMMs
    module = GroupedExperts(n_experts, dim, hidden).cuda()
    for w in (module.w1, module.w2, module.w3):
        torch.nn.init.normal_(w, std=0.02)
    rows = []

    def timed(label: str, fn, extra: dict | None = None, mode: str | None = None) -> None:
        timed_case(rows, label, fn, flops, extra, mode, compile_)

    for label, cnt in (("routed", counts), ("padded128", pad_counts(counts))):
        x = torch.randn(int(cnt.sum()), dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        timed(f"GroupedExperts {label}", lambda x=x, cnt=cnt: module(x, cnt).sum().backward(),
              {"rows": int(cnt.sum())})
    x = torch.randn(slots, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # max-autotune lets inductor choose between aten's grouped GEMM and its own persistent
    # Triton template, by timing both at these shapes
    timed("GroupedExperts routed, max-autotune",
          lambda: module(x, counts).sum().backward(), {"rows": slots},
          mode="max-autotune-no-cudagraphs")

    cap = int(pad_counts(counts.max().reshape(1))[0])
    xb = torch.randn(n_experts, cap, dim, device="cuda", dtype=torch.bfloat16,
                     requires_grad=True)

    def capacity_bmm():
        w13 = torch.cat([module.w1, module.w3], dim=1).to(torch.bfloat16).transpose(-2, -1)
        h1, h3 = torch.bmm(xb, w13).chunk(2, dim=-1)
        y = torch.bmm(F.silu(h1) * h3, module.w2.to(torch.bfloat16).transpose(-2, -1))
        y.sum().backward()

    timed(f"capacity bmm ({cap} rows per expert)", capacity_bmm, {"rows": n_experts * cap})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="wide", help="a file under trainer/configs/")
    parser.add_argument("--micro-batch", type=int, help="default: the config's")
    parser.add_argument("--cases", nargs="+", default=["kernels", "experts"],
                        choices=["kernels", "experts", "fp8", "fp8experts"])
    parser.add_argument("--out", type=Path, default=Path("grouped_gemm.json"))
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("no torch: nothing to measure")
        return 0
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        print("no CUDA GPU (or no torch._grouped_mm): nothing to measure")
        return 0
    cfg = tomllib.loads((REPO / "trainer" / "configs" / f"{args.config}.toml").read_text())
    m, t = cfg["model"], cfg["training"]
    mbs = args.micro_batch or t["micro_batch_size"]
    tokens = mbs * t["seq_len"]
    counts = routed_counts(tokens, m["n_activated_experts"], m["n_routed_experts"])
    # the compiled module's weight-gradient GEMM asserts on groups whose byte size is not
    # a multiple of 16 (a layout the model's own graph does not produce): for it, tokens
    # are routed in runs of 16 slots
    counts16 = 16 * routed_counts(tokens // 16, m["n_activated_experts"],
                                  m["n_routed_experts"], seed=1)
    dim, hidden = m["dim"], m["moe_inter_dim"]
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
              "config": args.config, "micro_batch": mbs, "tokens": tokens,
              "experts": m["n_routed_experts"], "dim": dim, "hidden": hidden,
              "slots": int(counts.sum()), "group_min": int(counts.min()),
              "group_max": int(counts.max()), "rows": []}
    for case in args.cases:
        try:
            rows = (kernel_cases(counts, dim, hidden) if case == "kernels"
                    else fp8_cases(counts, dim, hidden) if case == "fp8"
                    else fp8_expert_cases(counts16, dim, hidden) if case == "fp8experts"
                    else expert_cases(counts16, dim, hidden))
        except Exception as exc:
            rows = [{"case": case, "error": repr(exc)[:2000]}]
        result["rows"] += rows
        for row in rows:
            print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
