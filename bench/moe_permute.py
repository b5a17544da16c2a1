"""The MoE layer's token permutation alone: the dispatch (each token's row repeated top-k
times, in expert order) and the combine (the experts' rows back in slot order, weighted
by the gate, summed per token), compiled, forward and forward + backward.

    python bench/moe_permute.py --config trainer/configs/small.toml --out permute.json

With --sweep it also times the model's moves, eager, forward + backward, for every tile
(2,048 to 16,384 elements a program) and warps (4, 8, 16) of the GPU kernels.

Three variants on the same routing (random top-k of the config's experts, seed 0):

- model: trainer.model.permute's dispatch and combine as the model runs them (on the GPU
  its Triton kernels, elsewhere the gathers below);
- gather: the moves written plainly (``dispatch_reference``, ``combine_reference``), gathers
  by a permutation forward and backward, which torch.compile fuses with the weighted sum;
- scatter: the same moves written as index_copy scatters (the model's code before the
  gathers), whose combine writes the permuted rows out before the weighted sum reads them
  back.

Each is first checked against the gathers (outputs and gradients, eager; the largest
difference relative to the largest element, 0 where they agree bit for bit). Sizes are the
config's (tokens = micro-batch x sequence, --micro-batch and --seq-len override), on the
GPU when there is one, else the CPU. Prints the median milliseconds of each and writes
them as JSON with --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def scatter_dispatch(x, topk, order, rank):
    import torch

    slots = x.unsqueeze(1).expand(-1, topk, -1).reshape(-1, x.size(-1))
    return torch.index_copy(torch.empty_like(slots), 0, rank, slots)


def scatter_combine(y_sorted, weights, order, rank):
    import torch

    y = torch.index_copy(torch.empty_like(y_sorted), 0, order, y_sorted)
    topk = weights.size(-1)
    return (y.view(-1, topk, y.size(-1)) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)


def routing(tokens: int, topk: int, experts: int, device):
    """Each token's top-k distinct experts at random, and the gate's weights: the
    model's sort into expert order (order) and its inverse (rank)."""
    import torch

    from trainer.model.permute import sort_slots

    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(tokens, experts, device=device, generator=g)
    weights, indices = scores.topk(topk, dim=-1)
    _, order, rank = sort_slots(indices)
    return weights, order, rank


def timed(fn, steps: int, device) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def sized(doc: str, argv: list[str] | None, extra=None):
    """The command line of a bench that times one part of the model at a config's sizes:
    its arguments, the config, the tokens of a micro-batch (micro-batch x sequence, either
    overridden) and the device (the GPU when there is one). ``extra(parser)`` adds a
    bench's own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(parser)
    parser.add_argument("--config", type=Path, default=REPO / "trainer/configs/small.toml")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from trainer.config import load_config

    cfg = load_config(args.config)
    t = cfg.training
    tokens = (args.micro_batch or t.micro_batch_size) * (args.seq_len or t.seq_len)
    return args, cfg, tokens, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finish(result: dict, out: Path | None, agree: bool) -> int:
    """Write ``result`` to ``out`` (if given) as JSON; the exit status: 1 when the kernels
    disagreed with their expression, else 0."""
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if agree else 1


def sweep_option(what: str):
    """The ``extra`` of ``sized`` that adds --sweep (help: "also time ``what``")."""
    def add(parser) -> None:
        parser.add_argument("--sweep", action="store_true", help=f"also time {what}")
    return add


def sweep(module, grid: dict[str, tuple[str, tuple]], run, timed_as: str) -> list[dict]:
    """``run()`` (milliseconds) for every combination of ``module``'s constants in ``grid``
    (constant -> (its key in the rows, its values)), each set on the module for its run
    and the shipped values put back after. One row per combination: each constant's
    value under its key, and the time under ``timed_as``."""
    shipped = {name: getattr(module, name) for name in grid}
    rows = []
    try:
        for values in itertools.product(*(vals for _, vals in grid.values())):
            for name, value in zip(grid, values, strict=True):
                setattr(module, name, value)
            row = {key: value for (key, _), value in zip(grid.values(), values, strict=True)}
            row[timed_as] = run()
            rows.append(row)
            print(", ".join(f"{key} {value:>5}" for key, value in list(row.items())[:-1])
                  + f": {row[timed_as]:8.4f} ms"
                  + (" (shipped)" if tuple(values) == tuple(shipped.values()) else ""))
    finally:
        for name, value in shipped.items():
            setattr(module, name, value)
    return rows


# --sweep: the kernels' tile (elements of rows a program moves) and warps, each pair timed
SWEEP = {"TILE": ("tile", (2048, 4096, 8192, 16384)), "NUM_WARPS": ("warps", (4, 8, 16))}


def main(argv: list[str] | None = None) -> int:
    args, cfg, tokens, device = sized(__doc__, argv, sweep_option(
        "the model's moves, eager, for each tile and warps"))

    import torch

    from trainer.model import permute
    from trainer.model.permute import combine, combine_reference, dispatch, dispatch_reference

    m = cfg.model
    topk, dim = m.n_activated_experts, m.dim
    weights, order, rank = routing(tokens, topk, m.n_routed_experts, device)
    weights.requires_grad_()  # the gate's weights learn through the combine, as in the model
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    y_sorted = torch.randn(tokens * topk, dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True)
    gx = torch.randn(tokens * topk, dim, device=device, dtype=torch.bfloat16)
    gy = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    variants = {"model": (dispatch, combine), "gather": (dispatch_reference, combine_reference),
                "scatter": (scatter_dispatch, scatter_combine)}

    def moves(pair):
        d, c = pair
        return d(x, topk, order, rank), c(y_sorted, weights, order, rank)

    results = {}
    for name, pair in variants.items():
        outs = moves(pair)
        torch.autograd.backward(outs, (gx, gy))
        results[name] = [o.detach() for o in outs] + [x.grad, y_sorted.grad, weights.grad]
        x.grad = y_sorted.grad = weights.grad = None
    differences = {name: max(((a.float() - b.float()).abs().max()
                              / b.float().abs().max().clamp(min=1e-30)).item()
                             for a, b in zip(outs, results["gather"], strict=True))
                   for name, outs in results.items()}
    # bf16 rows summed in another order, or a weight's gradient summed in fp32 rather than
    # bf16, differ in the last bits; anything else is a fault
    agree = max(differences.values()) < 2e-2
    result = {"config": str(args.config), "device": str(device), "torch": torch.__version__,
              "tokens": tokens, "topk": topk, "dim": dim, "agree": agree,
              "difference": differences, "ms": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    print(f"{tokens} tokens x top-{topk}, dim {dim}, on {device}; the variants agree with "
          f"the gathers: {agree} (largest relative difference {differences})")
    for name, pair in variants.items():
        torch._dynamo.reset()
        step = torch.compile(lambda pair=pair: moves(pair))
        forward = timed(lambda step=step: step(), args.steps, device)

        def both(step=step):
            torch.autograd.backward(step(), (gx, gy))
            x.grad = y_sorted.grad = weights.grad = None
        result["ms"][name] = {"forward": forward, "forward+backward": timed(both, args.steps,
                                                                           device)}
        print(f"{name:>8}: forward {forward:8.2f} ms, forward + backward "
              f"{result['ms'][name]['forward+backward']:8.2f} ms")
    if args.sweep:
        def eager_both():
            torch.autograd.backward(moves(variants["model"]), (gx, gy))
            x.grad = y_sorted.grad = weights.grad = None
        result["sweep"] = sweep(permute, SWEEP, lambda: timed(eager_both, args.steps, device),
                                "forward+backward")
    return finish(result, args.out, agree)


if __name__ == "__main__":
    sys.exit(main())
