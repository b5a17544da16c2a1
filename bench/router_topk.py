"""The router's choice of experts alone, at a config's sizes (tokens = micro-batch x
sequence, the config's routed experts and top-k), on scores like the gate's (sigmoid of
random logits plus a small bias, fp32).

    python bench/router_topk.py --config trainer/configs/small.toml --out router_topk.json

Two variants, each timed alone (eager) and inside the whole gate, compiled (its fp32
logits, the scores, the choice, the weights gathered and normalised):

- model: ``trainer.model.topk.top_k`` as the model runs it (on the GPU its Triton kernel,
  elsewhere torch.topk);
- topk: torch.topk (the model's choice before the kernel).

They are first checked to choose the same experts: the chosen scores equal, row by row
and in order (the indices themselves may differ only where scores tie). With --sweep the
kernel is also timed for each rows-per-program and warps. Prints median milliseconds;
writes JSON with --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe_permute import finish, sized, sweep, sweep_option, timed  # the bench beside this one

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# --sweep: the kernel's rows per program and warps, each pair timed
SWEEP = {"ROWS": ("rows", (16, 32, 64, 128, 256)), "NUM_WARPS": ("warps", (1, 2, 4, 8))}


def main(argv: list[str] | None = None) -> int:
    args, cfg, tokens, device = sized(__doc__, argv, sweep_option(
        "the kernel for each rows per program and warps"))

    import torch

    from trainer.model import topk as tk
    from trainer.model.model import Gate

    m = cfg.model
    k, experts = m.n_activated_experts, m.n_routed_experts
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, m.dim, device=device, generator=g).to(torch.bfloat16)
    gate = Gate(m).to(device)
    torch.nn.init.normal_(gate.weight, std=m.dim ** -0.5, generator=g)
    gate.expert_bias.normal_(std=1e-2, generator=g)
    scores = torch.sigmoid(torch.nn.functional.linear(x.float(), gate.weight)) \
        + gate.expert_bias
    variants = {"model": tk.top_k, "topk": tk.reference}

    chosen = {name: fn(scores, k) for name, fn in variants.items()}
    agree = all(torch.equal(scores.gather(1, chosen[name]), scores.gather(1, chosen["topk"]))
                and bool((chosen[name].sort(dim=1)[0].diff(dim=1) > 0).all())
                for name in variants)
    same_indices = torch.equal(chosen["model"], chosen["topk"])
    kernel = tk.kernels_run(scores)  # else "model" is torch.topk too, and so is the sweep
    result = {"config": str(args.config), "device": str(device), "torch": torch.__version__,
              "tokens": tokens, "experts": experts, "topk": k, "kernel": kernel, "agree": agree,
              "same_indices": same_indices, "ms": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    print(f"{tokens} tokens, top-{k} of {experts} experts, on {device}; the same choices: "
          f"{agree} (the same indices: {same_indices})"
          + ("" if kernel else "; no Triton kernel here: both variants are torch.topk"))
    model_module = sys.modules[Gate.__module__]
    shipped_top_k = model_module.top_k
    try:
        for name, fn in variants.items():
            alone = timed(lambda fn=fn: fn(scores, k), args.steps, device)
            torch._dynamo.reset()
            model_module.top_k = fn  # what Gate.forward calls
            step = torch.compile(gate)
            whole = timed(lambda step=step: step(x), args.steps, device)
            result["ms"][name] = {"alone": alone, "gate compiled": whole}
            print(f"{name:>6}: alone {alone:7.3f} ms, the gate compiled {whole:7.3f} ms")
    finally:
        model_module.top_k = shipped_top_k
    if args.sweep:
        result["sweep"] = sweep(tk, SWEEP, lambda: timed(lambda: tk.top_k(scores, k), args.steps,
                                                         device), "ms")
    return finish(result, args.out, agree)


if __name__ == "__main__":
    sys.exit(main())
