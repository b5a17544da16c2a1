"""What one transformer block saves for backward, per token, measured on the CPU, next to
what trainer/memory.py counts for it.

    python bench/saved_activations.py --config wide --compile --tokens 256 512 \
        --out saved.json

The config (a path, or a name under trainer/configs) gives the widths. One dense layer
and one MoE layer are built (by default the first of each; --dense-layer, --moe-layer),
with random weights (seed 0), and three parts of them are measured, each run alone as
``x + part(norm(x))`` on one sequence of bf16 activations: the attention (the same module
in both kinds of layer; of the dense layer, if any), the dense feed-forward and the MoE
feed-forward. Each part runs its forward under bf16 CPU autocast, with --compile
torch.compile'd (Module.compile, as trainer.parallel.apply.apply_compile compiles each
block; here each part on its own), afresh for each token count, as the trainer compiles
for its one sequence length, and everything autograd saves for backward is recorded with
torch.autograd.graph.saved_tensors_hooks: each storage counted once, the parameters left
out. The bytes saved per token are the difference between two token counts (--tokens,
first and last) divided by the difference of the counts, so that what does not grow with
the tokens (autocast's bf16 copies of the weights) drops out. Next to each:
trainer.memory's count for the same part (attention_activation_bytes and
ffn_activation_bytes without activation checkpointing, compiled or not as measured); a
block is its attention plus its feed-forward.

With --gpu-path (the default; --cpu-path turns it off) the parts run what the GPU runs
in place of the CPU's kernels, as operators that save for backward what the GPU's do:

- the routed experts as GroupedExperts runs them on the GPU (torch._grouped_mm, w1 and w3
  stacked into one GEMM), in place of the CPU's loop over the experts;
- their SwiGLU as an opaque operator that saves only its input, as the Triton kernel of
  trainer/model/swiglu.py does;
- the attention as an opaque operator that saves q, k, v, its output and an fp32
  log-sum-exp per head and token, as cuDNN's does, in place of the CPU's math attention.

The stand-ins are registered under the ``dsk_bench`` operator namespace, and the model's
attributes they replace are restored afterwards. Prints bytes per token, measured and
counted, and writes them with each part's saved bytes at every token count as JSON with
--out; --list prints every saved storage at the last token count.

wide.toml compiled, as above (torch 2.13 on two CPU cores, about a minute): attention
35,016 bytes per token, dense feed-forward 73,860, MoE feed-forward 129,320.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu_fp8 import config_path  # noqa: E402
from trainer import memory  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.model import model as M  # noqa: E402

# --------------------------------------------------------------------------- stand-ins


@torch.library.custom_op("dsk_bench::swiglu", mutates_args=())
def _swiglu(h: torch.Tensor) -> torch.Tensor:
    a, b = h.chunk(2, dim=-1)
    return (F.silu(a.float()) * b.float()).to(h.dtype)


@_swiglu.register_fake
def _(h):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("dsk_bench::swiglu_backward", mutates_args=())
def _swiglu_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    a, b = h.float().chunk(2, dim=-1)
    s = torch.sigmoid(a)
    g = grad.float()
    return torch.cat([g * b * s * (1 + a * (1 - s)), g * a * s], dim=-1).to(h.dtype)


@_swiglu_backward.register_fake
def _(h, grad):
    return torch.empty_like(h)


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])  # the input only, as the Triton kernel


def _swiglu_grad(ctx, grad):
    (h,) = ctx.saved_tensors
    return torch.ops.dsk_bench.swiglu_backward(h, grad.contiguous())


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def _causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    t = q.shape[-2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~mask, float("-inf"))


@torch.library.custom_op("dsk_bench::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention (batch, heads, seq, head_dim): the output, and the fp32
    log-sum-exp of each row of scores (batch, heads, seq)."""
    with torch.autocast(q.device.type, enabled=False):
        s = _causal_scores(q, k, scale)
        lse = s.logsumexp(-1)
        out = (torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(q.dtype)
        # cuDNN writes its output in (batch, seq, heads, head_dim) order
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out, lse


@_attention.register_fake
def _(q, k, v, scale):
    b, h, t, _ = q.shape
    out = q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("dsk_bench::attention_backward", mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        g = grad.float()
        p = torch.exp(_causal_scores(q, k, scale) - lse.unsqueeze(-1))
        dv = p.transpose(-2, -1) @ g
        dp = g @ v.float().transpose(-2, -1)
        ds = p * (dp - (g * out.float()).sum(-1, keepdim=True))
        dq = ds @ k.float() * scale
        dk = ds.transpose(-2, -1) @ q.float() * scale
    # in the layouts of q, k and v, as the fake kernel says
    return (torch.empty_like(q).copy_(dq), torch.empty_like(k).copy_(dk),
            torch.empty_like(v).copy_(dv))


@_attention_backward.register_fake
def _(q, k, v, out, lse, grad, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])  # as cuDNN's attention
    ctx.scale = scale


def _attention_grad(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*torch.ops.dsk_bench.attention_backward(q, k, v, out, lse, grad, ctx.scale),
            None)


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def gpu_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  **kwargs):
    """F.scaled_dot_product_attention as MLA calls it (causal, no mask, no dropout)."""
    if attn_mask is not None or dropout_p or not is_causal or kwargs:
        raise NotImplementedError("the attention stand-in is causal, without mask or dropout")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.dsk_bench.attention(q, k, v, scale)[0]


def gpu_swiglu(h: torch.Tensor) -> torch.Tensor:
    return torch.ops.dsk_bench.swiglu(h.contiguous())


def gpu_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """GroupedExperts.forward as on the GPU: its grouped GEMMs (GroupedExperts._grouped),
    in the CPU's autocast dtype."""
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))
    return self._grouped(x, counts)


@contextlib.contextmanager
def gpu_path():
    """The model runs the stand-ins of the GPU's kernels until exit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(M.GroupedExperts, "forward", gpu_experts))
        stack.enter_context(mock.patch.object(M, "swiglu", gpu_swiglu))
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention",
                                              gpu_attention))
        yield


# --------------------------------------------------------------------------- measuring


class Part(nn.Module):
    """One part of a block, run alone with its residual: ``x + attn(attn_norm(x))`` or
    ``x + ffn(ffn_norm(x))``."""

    def __init__(self, block: M.Block, part: str):
        super().__init__()
        self.block, self.part = block, part

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        if self.part == "attention":
            return x + self.block.attn(self.block.attn_norm(x), freqs_cis)
        return x + self.block.ffn(self.block.ffn_norm(x))


def build_block(m, layer: int) -> M.Block:
    torch.manual_seed(0)
    block = M.Block(layer, m)
    for p in block.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=0.02)
        else:
            nn.init.ones_(p)
    return block


def saved_storages(part: Part, tokens: int, dim: int, freqs: torch.Tensor) -> list[dict]:
    """Each storage autograd saves in ``part``'s forward on ``tokens`` tokens, once, the
    parameters' left out; then runs the backward (the stand-ins' too)."""
    params = {p.untyped_storage().data_ptr() for p in part.parameters()}
    seen: dict[int, dict] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in params:
            return t
        if key not in seen:
            seen[key] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                         "bytes": storage.nbytes(), "views": 0}
        seen[key]["views"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(part, tokens, dim, freqs)
    return list(seen.values())


def run(part: Part, tokens: int, dim: int, freqs: torch.Tensor) -> None:
    """``part``'s forward on ``tokens`` tokens of bf16 activations under bf16 autocast,
    then its backward."""
    x = torch.randn(1, tokens, dim).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = part(x, freqs[:tokens])
    y.float().sum().backward()
    part.zero_grad(set_to_none=True)


def measure(part: Part, token_counts: list[int], dim: int, freqs: torch.Tensor,
            compile: bool, listing: bool) -> dict:
    """Saved bytes at each token count and their slope (bytes per token)."""
    saved = {}
    for tokens in token_counts:
        if compile:
            # compiled for this length alone (static shapes, as at one sequence length),
            # and run once without the hooks so that compiling saves nothing here
            torch._dynamo.reset()
            run(part, tokens, dim, freqs)
        storages = saved_storages(part, tokens, dim, freqs)
        saved[tokens] = sum(s["bytes"] for s in storages)
        if listing and tokens == token_counts[-1]:
            print(f"  {len(storages)} storages at {tokens} tokens:")
            for s in storages:
                print(f"    {s['dtype']:10} {str(tuple(s['shape'])):24} {s['bytes']:>12,} B "
                      f"{s['bytes'] / tokens:>10,.1f} B/token  views {s['views']}")
    first, last = token_counts[0], token_counts[-1]
    return {"measured": (saved[last] - saved[first]) / (last - first),
            "saved_bytes": {str(t): b for t, b in saved.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="wide",
                        help="a config file, or a name under trainer/configs")
    parser.add_argument("--dense-layer", type=int,
                        help="the dense layer to measure (default: the first, if any)")
    parser.add_argument("--moe-layer", type=int,
                        help="the MoE layer to measure (default: the first, if any)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512],
                        help="token counts (one sequence); the slope is between the first "
                             "and the last")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each part, as the trainer compiles its blocks")
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--gpu-path", dest="gpu_path", action="store_true", default=True,
                      help="stand in for the GPU's kernels (the default)")
    path.add_argument("--cpu-path", dest="gpu_path", action="store_false",
                      help="run the CPU's own kernels")
    parser.add_argument("--list", action="store_true",
                        help="print each saved storage at the last token count")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    tokens = sorted(set(args.tokens))
    if len(tokens) < 2 or tokens[0] < 1:
        parser.error("--tokens needs two different positive counts")
    cfg_path = config_path(args.config)
    cfg = load_config(cfg_path)
    m = dataclasses.replace(cfg.model, max_seq_len=max(cfg.model.max_seq_len, tokens[-1]))
    dense_layers = range(m.n_dense_layers)
    moe_layers = range(m.n_dense_layers, m.n_layers)
    layers = {}
    for kind, chosen, allowed in (("dense", args.dense_layer, dense_layers),
                                  ("moe", args.moe_layer, moe_layers)):
        if chosen is None:
            if len(allowed):
                layers[kind] = allowed[0]
        elif chosen in allowed:
            layers[kind] = chosen
        else:
            parser.error(f"layer {chosen} of {cfg_path.name} is not a {kind} layer "
                         f"({kind} layers: {list(allowed)})")
    freqs = M.precompute_rope(m)
    mode = "none"
    result = {"config": str(args.config), "torch": torch.__version__, "tokens": tokens,
              "compile": args.compile, "gpu_path": args.gpu_path, "layers": layers,
              "parts": {}, "blocks": {}}
    print(f"{cfg_path.name}: layers {layers}, tokens {tokens}, "
          f"{'compiled' if args.compile else 'eager'}, "
          f"{'GPU' if args.gpu_path else 'CPU'} kernels")
    # the attention is the same module in either kind of layer: measured once
    plan = [("attention", layers.get("dense", layers.get("moe")), "attention",
             memory.attention_activation_bytes(m, mode))]
    if "dense" in layers:
        plan.append(("dense_ffn", layers["dense"], "ffn",
                     memory.ffn_activation_bytes(m, False, mode, args.compile)))
    if "moe" in layers:
        plan.append(("moe_ffn", layers["moe"], "ffn",
                     memory.ffn_activation_bytes(m, True, mode, args.compile)))
    with gpu_path() if args.gpu_path else contextlib.nullcontext():
        for name, layer, what, counted in plan:
            part = Part(build_block(m, layer), what)
            if args.compile:
                part.compile()
            print(f"{name} (layer {layer}):")
            found = measure(part, tokens, m.dim, freqs, args.compile, args.list)
            result["parts"][name] = {"layer": layer, **found, "counted": counted}
    parts = result["parts"]
    for kind in layers:
        ffn = parts[f"{kind}_ffn"]
        result["blocks"][kind] = {
            "layer": layers[kind],
            "measured": parts["attention"]["measured"] + ffn["measured"],
            "counted": parts["attention"]["counted"] + ffn["counted"]}
    print(f"\n{'bytes per token':<16} {'measured':>10} {'counted':>10} {'counted/measured':>17}")
    rows = [(name, p) for name, p in parts.items()]
    rows += [(f"{kind} block", b) for kind, b in result["blocks"].items()]
    for name, row in rows:
        ratio = row["counted"] / row["measured"] if row["measured"] else float("nan")
        print(f"{name:<16} {row['measured']:>10,.1f} {row['counted']:>10,.1f} {ratio:>17.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
