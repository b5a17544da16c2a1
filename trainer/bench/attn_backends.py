"""Forward + backward time of causal attention with MLA's head shapes, per SDPA backend.

    python -m trainer.bench.attn_backends [--batch 4] [--heads 16] [--seq 4096] \
        [--qk-dim 96] [--v-dim 64] [--layout bhsd|bshd]

MLA's query/key heads (nope + rope) are wider than its value heads; some kernels need
equal widths, so each backend is also timed with the values zero-padded to the query width.
``--layout bshd`` makes the tensors (batch, sequence, heads, dim) in memory and hands SDPA
their transposed views, as the model's attention does; ``bhsd`` (the default) makes them
contiguous in SDPA's own order.
TFLOP/s counts the work the causal mask leaves: forward 2 * b * h * s^2 * (d_qk + d_v) / 2,
backward 2.5 times that.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--qk-dim", type=int, default=96)
    parser.add_argument("--v-dim", type=int, default=64)
    parser.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd",
                        help="the tensors' order in memory (bshd: as the model has them)")
    a = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU")
        return 1
    dev = "cuda"

    def make(width: int) -> torch.Tensor:
        if a.layout == "bshd":
            t = torch.randn(a.batch, a.seq, a.heads, width, device=dev, dtype=torch.bfloat16)
            t = t.transpose(1, 2)
        else:
            t = torch.randn(a.batch, a.heads, a.seq, width, device=dev, dtype=torch.bfloat16)
        return t.requires_grad_()
    q, k, v = make(a.qk_dim), make(a.qk_dim), make(a.v_dim)
    flops = 2 * a.batch * a.heads * a.seq * a.seq * (a.qk_dim + a.v_dim) / 2 * 3.5
    print(f"b {a.batch} h {a.heads} s {a.seq} d_qk {a.qk_dim} d_v {a.v_dim} (causal), "
          f"layout {a.layout}")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        for pad in (False, True):
            def run(backend=backend, pad=pad) -> None:
                vv = F.pad(v, (0, a.qk_dim - a.v_dim)) if pad else v
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
                out[..., :a.v_dim].sum().backward()
            try:
                s = timed(run)
                print(f"  {backend.name:<22} pad_v={pad!s:<5} {s * 1e3:7.2f} ms  "
                      f"{flops / s / 1e12:6.0f} TFLOP/s")
            except RuntimeError as exc:
                print(f"  {backend.name:<22} pad_v={pad!s:<5} unavailable: "
                      f"{str(exc).splitlines()[0][:100]}")
    with torch.no_grad():  # which backend the default dispatch picks
        prof_q, prof_k, prof_v = q.detach(), k.detach(), v.detach()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(prof_q, prof_k, prof_v, is_causal=True)
            torch.cuda.synchronize()
        names = {e.name for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA}
        print("default dispatch kernels:", "; ".join(sorted(n[:80] for n in names)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
