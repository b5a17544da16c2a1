"""MLA's attention inputs alone, at a config's sizes: the queries' rope part rotated, the
keys built from the latent's nope part and the one rotated rope key, and the values
(``trainer.model.rope.mla_qkv``), forward and forward + backward, compiled.

    python bench/mla_rope.py --config trainer/configs/small.toml --micro-batch 12 \
        --out mla_rope.json

Two variants on the same inputs (bf16, seed 0; the rope key a strided slice of the
latent's projection, as in the model):

- model: ``mla_qkv`` as the model runs it (on the GPU its Triton kernels, elsewhere the
  expression below);
- expression: the plain torch expression (``rope.reference``), which torch.compile fuses.

Each is timed alone and inside the whole attention layer (``MLA``, its projections and
attention included), compiled, forward + backward. The model's outputs and gradients are
first checked against the expression's computed in fp32 (the largest difference relative
to the largest element). With --sweep the kernels are also timed, eager, forward +
backward, for each tile and warps. Prints median milliseconds; writes JSON with --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe_permute import finish, sized, sweep, sweep_option, timed  # the bench beside this one

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# --sweep: the kernels' largest tile (elements) and warps, each pair timed
SWEEP = {"TILE": ("tile", (1024, 2048, 4096, 8192, 16384)), "NUM_WARPS": ("warps", (2, 4, 8))}


def main(argv: list[str] | None = None) -> int:
    args, cfg, tokens, device = sized(__doc__, argv, sweep_option(
        "the kernels, eager, for each tile and warps"))

    import torch

    from trainer.model import rope
    from trainer.model.model import MLA
    from trainer.model.rope import precompute_rope

    m = cfg.model
    seq = args.seq_len or cfg.training.seq_len
    bsz = tokens // seq
    heads, nope, rp, vd = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g).to(torch.bfloat16)
    q = randn(bsz, seq, heads, nope + rp).requires_grad_()
    kv = randn(bsz, seq, heads, nope + vd).requires_grad_()
    latent = randn(bsz, seq, m.kv_lora_rank + rp).requires_grad_()
    k_pe = latent[..., m.kv_lora_rank:]
    freqs = precompute_rope(m)[:seq].to(device)
    grads = [randn(bsz, seq, heads, w) for w in (nope + rp, nope + rp, vd)]
    variants = {"model": rope.mla_qkv, "expression": rope.reference}

    def both(fn):
        torch.autograd.backward(fn(q, kv, k_pe, freqs), grads)
        q.grad = kv.grad = latent.grad = None

    # the model's outputs and gradients against the expression's in fp32
    outs = list(rope.mla_qkv(q, kv, k_pe, freqs))
    torch.autograd.backward(outs, grads)
    mine = [o.detach().float() for o in outs] + [x.grad.float() for x in (q, kv, latent)]
    up = [x.detach().float().requires_grad_() for x in (q, kv, latent)]
    exact = list(rope.reference(up[0], up[1], up[2][..., m.kv_lora_rank:], freqs))
    torch.autograd.backward(exact, [gr.float() for gr in grads])
    exact = [o.detach() for o in exact] + [x.grad for x in up]
    q.grad = kv.grad = latent.grad = None
    difference = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                     for a, b in zip(mine, exact, strict=True))
    agree = difference < 1e-2  # bf16 rounding of fp32 results; anything more is a fault
    kernel = rope.kernels_run(q)
    result = {"config": str(args.config), "device": str(device), "torch": torch.__version__,
              "tokens": tokens, "heads": heads, "widths": {"nope": nope, "rope": rp, "v": vd},
              "kernel": kernel, "agree": agree, "difference": difference, "ms": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    print(f"{tokens} tokens, {heads} heads of {nope} + {rp} / {vd}, on {device}; the model "
          f"agrees with the expression: {agree} (largest relative difference {difference:.2e})"
          + ("" if kernel else "; no Triton kernel here: both variants are the expression"))

    layer = MLA(m).to(device)
    x = randn(bsz, seq, m.dim).requires_grad_()
    gx = randn(bsz, seq, m.dim)
    model_module = sys.modules[MLA.__module__]
    shipped = model_module.mla_qkv
    try:
        for name, fn in variants.items():
            torch._dynamo.reset()
            step = torch.compile(fn)
            forward = timed(lambda step=step: step(q, kv, k_pe, freqs), args.steps, device)
            alone = timed(lambda step=step: both(step), args.steps, device)
            torch._dynamo.reset()
            model_module.mla_qkv = fn  # what MLA.forward calls
            attn = torch.compile(layer)

            def whole(attn=attn):
                with torch.autocast(device.type, torch.bfloat16):
                    out = attn(x, freqs)
                out.backward(gx)
                x.grad = None
                layer.zero_grad(set_to_none=True)
            result["ms"][name] = {"forward": forward, "forward+backward": alone,
                                  "layer forward+backward": timed(whole, args.steps, device)}
            print(f"{name:>10}: forward {forward:7.3f} ms, forward + backward {alone:7.3f} ms, "
                  f"the layer {result['ms'][name]['layer forward+backward']:7.3f} ms")
    finally:
        model_module.mla_qkv = shipped
    if args.sweep:
        result["sweep"] = sweep(rope, SWEEP, lambda: timed(lambda: both(rope.mla_qkv),
                                                           args.steps, device),
                                "forward+backward")
    return finish(result, args.out, agree)


if __name__ == "__main__":
    sys.exit(main())
