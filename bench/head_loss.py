"""The output head and its cross-entropy alone, compiled, forward + backward, at a config's
sizes (tokens = micro-batch x sequence, the config's dim and vocabulary), in bf16.

    python bench/head_loss.py --config trainer/configs/small.toml --out head_loss.json

Two variants on the same inputs (seed 0):

- op: ``dsk::head_loss`` (trainer/model/head_loss.py), as the model runs it: one GEMM for
  the logits, one pass for the loss and the logits' gradient, the two GEMMs of backward;
- cross_entropy: the head as a matmul and ``F.cross_entropy`` of its fp32-cast logits,
  compiled together (the model's code before the op).

Both are first checked to agree (loss, the gradients of the hidden states and the
weight). Also timed: the op's loss-and-gradient pass alone, each Triton kernel on a GPU
(the vocabulary in blocks, and in whole rows with 8, 16 and 32 warps), with the memory
bandwidth it reaches counting one read and one write of the logits.
Prints median milliseconds and the peak memory of each variant; writes JSON with --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe_permute import finish, sized, timed  # the bench beside this one

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    args, cfg, tokens, device = sized(__doc__, argv)

    import torch

    from trainer.model import head_loss as hl
    from trainer.model.head_loss import (
        cross_entropy_head,
        head_loss,
        loss_and_grad_,
        loss_and_grads,
    )

    m = cfg.model
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, m.dim, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(m.vocab_size, m.dim, device=device, generator=g) * 0.02
              ).to(dtype).requires_grad_()
    targets = torch.randint(0, m.vocab_size, (tokens,), device=device, generator=g)
    variants = {"op": head_loss, "cross_entropy": cross_entropy_head}

    (la, ha, wa), (lb, hb, wb) = ([t.float() for t in loss_and_grads(fn, h, weight, targets)]
                                  for fn in variants.values())
    errors = {"loss": abs(la - lb).item(),
              "grad_h": ((ha - hb).abs().max() / hb.abs().max()).item(),
              "grad_weight": ((wa - wb).abs().max() / wb.abs().max()).item()}
    agree = errors["loss"] < 1e-3 * abs(lb.item()) and max(errors["grad_h"],
                                                           errors["grad_weight"]) < 2e-2
    result = {"config": str(args.config), "device": str(device), "torch": torch.__version__,
              "tokens": tokens, "dim": m.dim, "vocab": m.vocab_size, "agree": agree,
              "errors": errors, "ms": {}, "peak_gib": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    print(f"{tokens} tokens, dim {m.dim}, vocabulary {m.vocab_size}, on {device}; the "
          f"variants agree: {agree} ({errors})")
    for name, fn in variants.items():
        torch._dynamo.reset()
        step = torch.compile(fn)

        def both(step=step):
            step(h, weight, targets).backward()
            h.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        result["ms"][name] = timed(both, args.steps, device)
        if device.type == "cuda":
            result["peak_gib"][name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"{name:>14}: forward + backward {result['ms'][name]:8.2f} ms"
              + (f", peak {result['peak_gib'][name]:.2f} GiB above the inputs"
                 if name in result["peak_gib"] else ""))
    logits = torch.empty(tokens, m.vocab_size, device=device, dtype=dtype)
    fill = timed(lambda: logits.normal_(), args.steps, device)
    moved = 2 * logits.numel() * logits.element_size()
    kernels = {"as chosen": (None, hl.ROW_WARPS)}
    if device.type == "cuda" and hl.triton is not None:
        kernels = {"blocks": (False, hl.ROW_WARPS)}
        if m.vocab_size <= hl.ROW_MAX:
            kernels.update({f"whole rows, {w} warps": (True, w) for w in (8, 16, 32)})
    result["pass"] = {}
    chosen = hl.ROW_WARPS
    for name, (whole_rows, warps) in kernels.items():
        hl.ROW_WARPS = warps

        def kernel(whole_rows=whole_rows):
            logits.normal_()  # the pass overwrites its input: fresh logits every time
            loss_and_grad_(logits, targets, whole_rows=whole_rows)
        alone = timed(kernel, args.steps, device) - fill
        result["pass"][name] = {"ms": alone, "gb_per_s": moved / alone / 1e6}
        print(f"the loss-and-gradient pass alone, {name}: {alone:.2f} ms, "
              f"{moved / alone / 1e6:,.0f} GB/s (one read and one write of the logits)")
    hl.ROW_WARPS = chosen
    return finish(result, args.out, agree)


if __name__ == "__main__":
    sys.exit(main())
