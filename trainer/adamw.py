"""AdamW's update on the GPU as one Triton kernel per parameter, at the memory bandwidth.

torch's fused AdamW runs its multi-tensor kernel about 16% slower when it is handed a
``grad_scale`` (the trainer passes the gradient clip's coefficient that way): on wide.toml
40.6 ms a step against 34.8 without, while the update only reads the parameter, its
gradient and both moments once and writes the parameter and the moments once whatever
the scale. This kernel does that in 33.5 ms with the scale (docs/benchmarks.md).

``AdamW`` here is torch's fused AdamW (same state, same state_dict and checkpoints, same
hyper-parameters) whose ``step`` runs this kernel on contiguous CUDA parameters when it is
handed a scale; anything else takes torch's own step: no scale (torch's kernel is then the
faster, 34.6 against 36.6 ms on wide.toml), the CPU, Triton missing, amsgrad, maximize, a
non-contiguous tensor, a scale on another device.

The arithmetic is torch's (decoupled weight decay first, then the moments, then the step
with bias corrections, in fp32), so the two agree to float rounding: a GPU test compares
them over several steps with and without a scale.
"""

from __future__ import annotations

import torch

try:  # the GPU wheels of torch bring Triton; the CPU ones do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the wheel
    triton = None

# elements each program updates: memory-bound, so large blocks
BLOCK = 4096


if triton is not None:

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, scale_ptr, n, lr, beta1, beta2,
                      eps, weight_decay, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        step = tl.load(step_ptr).to(tl.float32)
        bias1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        g = g / tl.load(scale_ptr).to(tl.float32)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def _usable(group: dict, params: list[torch.Tensor], scale: torch.Tensor | None) -> bool:
    if triton is None or scale is None or group["amsgrad"] or group["maximize"]:
        return False
    device = params[0].device
    if scale.device != device:
        return False
    return all(p.is_cuda and p.device == device and p.is_contiguous() and p.grad.is_contiguous()
               and not p.grad.is_sparse and type(p) in (torch.Tensor, torch.nn.Parameter)
               for p in params)


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW whose update runs the kernel above where it can (see the
    module's docstring); a ``grad_scale`` attribute divides every gradient as it is read,
    as torch's does, and is what sends the step to the kernel."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        scale = getattr(self, "grad_scale", None)
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and not _usable(group, params, scale):
                return super().step(closure)
            groups.append((group, params))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, params in groups:
            if not params:
                continue
            steps = [self._state_of(p)["step"] for p in params]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = (float(b) for b in group["betas"])
            hyper = (float(group["lr"]), beta1, beta2, float(group["eps"]),
                     float(group["weight_decay"]))
            with torch.cuda.device(params[0].device):  # Triton launches on the current one
                for p, step in zip(params, steps, strict=True):
                    state = self.state[p]
                    _adamw_kernel[(triton.cdiv(p.numel(), BLOCK),)](
                        p, p.grad, state["exp_avg"], state["exp_avg_sq"], step, scale,
                        p.numel(), *hyper, BLOCK=BLOCK, num_warps=8)
        return loss

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, made as torch's fused AdamW makes it on first use."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
