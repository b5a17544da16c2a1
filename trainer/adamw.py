"""AdamW's update on the GPU as one Triton kernel per parameter, at the memory bandwidth,
and on the local shards of sharded (DTensor) parameters.

torch's fused AdamW runs its multi-tensor kernel about 16% slower when it is handed a
``grad_scale`` (the trainer passes the gradient clip's coefficient that way): on wide.toml
40.6 ms a step against 34.8 without, while the update only reads the parameter, its
gradient and both moments once and writes the parameter and the moments once whatever
the scale. This kernel does that in 33.5 ms with the scale (docs/benchmarks.md).

``AdamW`` here is torch's fused AdamW (same state, same state_dict and checkpoints, same
hyper-parameters) whose ``step`` runs this kernel on contiguous CUDA parameters when it is
handed a scale, and torch's fused kernel (``torch._fused_adamw_``) otherwise: no scale
(torch's kernel is then the faster, 34.6 against 36.6 ms on wide.toml), the CPU, Triton
missing, a non-contiguous tensor.

Sharded parameters (FSDP2, tp, ep: DTensors) are updated through their local tensors,
since AdamW is elementwise: every rank updates the part it holds, with the moments kept
as DTensors of the parameter's layout, so checkpoints and resharding see what torch's
optimizer would leave. Through DTensor's dispatch the same update costs host time per
tensor and operation, several times what it costs on the local tensors
(bench/optimizer_host.py, docs/benchmarks.md). A gradient of another layout than its
parameter's on the same mesh (under tp, a replicated parameter's gradient is a partial
sum) is first redistributed to the parameter's layout, which is what torch's step would
do. A gradient on another mesh, amsgrad and maximize take torch's own step, the
gradients divided by the scale first.

The arithmetic is torch's (decoupled weight decay first, then the moments, then the step
with bias corrections, in fp32), so the two agree to float rounding: a GPU test compares
the kernel with torch over several steps with and without a scale, and a CPU test the
sharded path with torch's optimizer on the same DTensors.

``moments_dtype=torch.bfloat16`` keeps both moments in bf16 (``training.moments_dtype``),
as DeepSeek-V3 trains: 4 bytes per parameter instead of 8, and 20 bytes of memory traffic
per update instead of 28. The arithmetic stays fp32; each moment is rounded once, when it
is stored. The kernel then runs with or without a scale (a scale of one stands in); every
other path computes on fp32 copies of the moments and stores them back rounded, so all
paths round alike. A checkpoint's moments, whatever their dtype, are held in the
configured one as soon as they are loaded (torch's load_state_dict casts them to the
parameter's).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from trainer.kernels import kernels_run, tl, triton

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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _localizable(p: torch.Tensor) -> bool:
    """Whether ``p``'s update can run on local tensors: a plain tensor, or a DTensor whose
    gradient has its layout (see _settle)."""
    if not isinstance(p, DTensor):
        return not isinstance(p.grad, DTensor) and not p.grad.is_sparse
    g = p.grad
    return (isinstance(g, DTensor) and g.device_mesh == p.device_mesh
            and tuple(g.placements) == tuple(p.placements))


def _settle(p: torch.Tensor) -> None:
    """A DTensor gradient of another layout than its parameter's on the same mesh (a
    partial sum, under tp) is redistributed to the parameter's layout."""
    g = p.grad
    if (isinstance(p, DTensor) and isinstance(g, DTensor) and g.device_mesh == p.device_mesh
            and tuple(g.placements) != tuple(p.placements)):
        p.grad = g.redistribute(p.device_mesh, p.placements)


def _kernel_usable(params: list[torch.Tensor], scale: torch.Tensor | None) -> bool:
    """The Triton kernel: CUDA, Triton, a scale on the parameters' device, contiguous local
    tensors (a parameter's and its gradient's)."""
    if scale is None or not kernels_run(*params):
        return False
    device = params[0].device
    return scale.device == device and all(
        p.device == device and _local(p).is_contiguous()
        and _local(p.grad).is_contiguous() for p in params)


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW whose update runs on local tensors, in the kernel above where it
    can (see the module's docstring); a ``grad_scale`` attribute divides every gradient as
    it is read, as torch's does."""

    def __init__(self, params, moments_dtype: torch.dtype = torch.float32, **kwargs):
        if moments_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moments_dtype must be torch.float32 or torch.bfloat16, "
                             f"not {moments_dtype}")
        super().__init__(params, fused=True, **kwargs)
        self.moments_dtype = moments_dtype
        self._ones: dict[torch.device, torch.Tensor] = {}

    @property
    def _narrow_moments(self) -> bool:
        return self.moments_dtype != torch.float32

    def _unit_scale(self, device: torch.device) -> torch.Tensor:
        """A scale of one on ``device``, for the kernel when no scale is handed."""
        if device not in self._ones:
            self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        return self._ones[device]

    @torch.no_grad()
    def step(self, closure=None):
        scale = getattr(self, "grad_scale", None)
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                _settle(p)
            if group["amsgrad"] or group["maximize"] or not all(map(_localizable, params)):
                return self._torch_step(closure, scale)
            groups.append((group, params))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, params in groups:
            if params:
                self._update(group, params, scale)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor],
                scale: torch.Tensor | None) -> None:
        states = [self._state_of(p) for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        lr, (beta1, beta2) = float(group["lr"]), (float(b) for b in group["betas"])
        eps, decay = float(group["eps"]), float(group["weight_decay"])
        kernel_scale = scale
        if scale is None and self._narrow_moments and params[0].is_cuda:
            kernel_scale = self._unit_scale(params[0].device)  # torch's kernel takes no bf16
        if _kernel_usable(params, kernel_scale):
            with torch.cuda.device(params[0].device):  # Triton launches on the current one
                for p, state in zip(params, states, strict=True):
                    local = _local(p)
                    if not local.numel():  # a rank's empty shard of a small parameter
                        continue
                    _adamw_kernel[(triton.cdiv(local.numel(), BLOCK),)](
                        local, _local(p.grad), _local(state["exp_avg"]),
                        _local(state["exp_avg_sq"]), state["step"], kernel_scale,
                        local.numel(), lr, beta1, beta2, eps, decay, BLOCK=BLOCK,
                        num_warps=8)
            return
        # one launch per device and dtype; with narrower moments one per parameter, so
        # that only one parameter's fp32 copies of them exist at a time
        narrow = self._narrow_moments
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype, i if narrow else 0), []).append(i)
        for (device, _, _), index in by_kind.items():
            kept = [(_local(states[i]["exp_avg"]), _local(states[i]["exp_avg_sq"]))
                    for i in index]
            wide = [(m.float(), v.float()) for m, v in kept]  # the same tensors when fp32
            torch._fused_adamw_(
                [_local(params[i]) for i in index], [_local(params[i].grad) for i in index],
                [m for m, _ in wide], [v for _, v in wide], [],
                [steps[i] for i in index], lr=lr, beta1=beta1, beta2=beta2,
                weight_decay=decay, eps=eps, amsgrad=False, maximize=False,
                grad_scale=None if scale is None else scale.to(device), found_inf=None)
            if narrow:
                for pair, wide_pair in zip(kept, wide, strict=True):
                    for moment, computed in zip(pair, wide_pair, strict=True):
                        moment.copy_(computed)

    def _torch_step(self, closure, scale: torch.Tensor | None):
        """torch's own step; a scale divides the gradients first (torch's fused step takes
        none for DTensors), and is put back for the next step's clip to replace. bf16
        moments are widened to fp32 for it and rounded back after."""
        narrow = self._narrow_moments
        if scale is None and not narrow:
            return super().step(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if scale is not None:
            divisor = float(scale)
            for p in params:
                p.grad.div_(divisor)
            del self.grad_scale
        if narrow:  # torch's step computes on the moments in their own dtype
            for p in params:
                state = self.state[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = state[key].float()
        try:
            return super().step(closure)
        finally:
            if scale is not None:
                self.grad_scale = scale
            if narrow:  # the step's fp32 moments, rounded to the configured dtype
                for p in params:
                    self._narrow(self.state[p])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, which casts the moments to each parameter's dtype (fp32); they are held
        in the configured dtype again at once, so no fp32 copy lives into the next step's
        activation peak."""
        super().load_state_dict(state_dict)
        for p in self.state:
            self._narrow(self.state[p])

    def _narrow(self, state: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and state[key].dtype != self.moments_dtype:
                state[key] = state[key].to(self.moments_dtype)

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, made as torch's fused AdamW makes it on first use (for a
        DTensor, moments of its layout)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=self.moments_dtype,
                                              memory_format=torch.preserve_format)
            return state
        if state["step"].device != p.device or state["step"].dtype != torch.float32:
            # a checkpoint of torch's unfused AdamW keeps its steps on the CPU
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        return state
