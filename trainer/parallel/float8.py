"""FP8 training (``training.fp8``) through torchao.

The dense matmuls (attention projections, dense and shared-expert SwiGLUs, MTP's
projection) become torchao ``Float8Linear`` modules with the configured recipe
("tensorwise", "rowwise" or "rowwise_with_gw_hp"). The router (``Gate``, fp32) and the
output head stay in bf16, as in DeepSeek-V3; so do linears whose widths are not multiples
of 16 (the FP8 GEMM needs them aligned) and, in training, the routed experts' grouped
GEMMs. ``Float8GroupedExperts`` runs those through torchao's FP8 rowwise grouped GEMM
(``torchao.prototype.moe_training``), each expert's token group padded to a multiple of
16 rows as the FP8 kernel needs; it trains correctly on a Hopper GPU but was measured
slower than bf16 there (see ``apply_fp8``), so the trainer does not use it. The
trainer's own FP8 routed experts (``training.fp8_experts``, ``apply_fp8_experts``) are
trainer.model.fp8_experts, with the casts fused into the kernels around the GEMMs.

With FSDP2 and the tensorwise recipe, parameters are all-gathered in float8
(``enable_fsdp_float8_all_gather``); each parameter's scale is then taken from its
shards' amax, all-reduced, when it is gathered. torchao is imported only here, only when
``training.fp8`` is on: a run without it (or on a GPU without FP8 matmuls) stops with an
error naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import InputError, TrainingConfig
from trainer.model import GroupedExperts, Transformer
from trainer.model.fp8_experts import ALIGN, CAPABILITIES, Fp8GroupedExperts, supported
from trainer.model.model import compute_dtype

FIELD = "training.fp8"
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
EXPERTS_FIELD = "training.fp8_experts"
SKIP_FIELD = "training.fp8_skip"
EXPERT_RECIPES = ("rowwise",)
TORCHAO_PIN = "torchao==0.18.0"  # the trainer extra's pin (pyproject.toml)


def _torchao():
    try:
        import torchao.float8  # noqa: F401
    except ImportError as exc:
        raise InputError(f"FP8 training needs torchao, which does not import here ({exc}); "
                         f"install '{TORCHAO_PIN}' (or the trainer extra), or set "
                         f"{FIELD} = \"off\"", field=FIELD) from None
    import torchao

    return torchao


def check_support(recipe: str, device: torch.device) -> None:
    """Raise InputError (naming training.fp8) unless ``recipe`` can train on ``device``
    with this torch and torchao."""
    if recipe not in RECIPES:
        raise InputError(f"unknown FP8 recipe {recipe!r} (known: off, {', '.join(RECIPES)})",
                         field=FIELD)
    if device.type != "cuda":
        raise InputError(f"FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer; "
                         f"this run is on {device.type}", field=FIELD)
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise InputError(f"FP8 matmuls need compute capability 8.9 or newer (Ada, Hopper, "
                         f"Blackwell); {torch.cuda.get_device_name(device)} has "
                         f"{capability[0]}.{capability[1]}", field=FIELD)
    if not hasattr(torch, "_scaled_mm"):
        raise InputError(f"torch {torch.__version__} has no torch._scaled_mm", field=FIELD)
    _torchao()


def check_experts_support(recipe: str, device: torch.device) -> None:
    """Raise InputError (naming training.fp8_experts) unless the routed experts' FP8
    grouped GEMMs (trainer.model.fp8_experts) can run on ``device``: torch's scaled
    grouped GEMM, which torch ships for Hopper and Blackwell (compute capability 9.0 and
    10.0) only, and Triton for the casts."""
    if recipe not in EXPERT_RECIPES:
        raise InputError(f"unknown FP8 experts recipe {recipe!r} "
                         f"(known: off, {', '.join(EXPERT_RECIPES)})", field=EXPERTS_FIELD)
    if device.type != "cuda":
        raise InputError(f"the routed experts' FP8 grouped GEMMs need a CUDA GPU of "
                         f"compute capability 9.0 or 10.0; this run is on {device.type}",
                         field=EXPERTS_FIELD)
    capability = torch.cuda.get_device_capability(device)
    if capability not in CAPABILITIES:
        raise InputError(f"torch's FP8 grouped GEMM runs on compute capability 9.0 and "
                         f"10.0 (Hopper, Blackwell) only; {torch.cuda.get_device_name(device)}"
                         f" has {capability[0]}.{capability[1]}", field=EXPERTS_FIELD)
    if not hasattr(torch, "_scaled_grouped_mm"):
        raise InputError(f"torch {torch.__version__} has no torch._scaled_grouped_mm",
                         field=EXPERTS_FIELD)
    from trainer.model import fp8_experts

    if fp8_experts.triton is None:
        raise InputError("the routed experts' FP8 casts are Triton kernels, and Triton "
                         "does not import here", field=EXPERTS_FIELD)


def apply_fp8_experts(model: Transformer, recipe: str, device: torch.device,
                      check: bool = True) -> dict[str, list[str]]:
    """Move the routed experts whose widths are multiples of 16 to Fp8GroupedExperts (in
    place) and return {"fp8": [...], "bf16": [...]} by module name. ``check`` (off in
    CPU tests only) first refuses a device or torch that cannot run them."""
    if check:
        check_experts_support(recipe, device)
    converted, kept = [], []
    for name, module in model.named_modules():
        if type(module) is GroupedExperts:
            if supported(module):
                module.__class__ = Fp8GroupedExperts
                converted.append(name)
            else:
                kept.append(name)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"fp8 experts ({recipe}): {len(converted)} routed experts' grouped GEMMs in "
              f"FP8; in bf16: {', '.join(kept) or 'nothing'}", flush=True)
    return {"fp8": converted, "bf16": kept}


def grouped_fp8_available(device: torch.device) -> bool:
    """Whether torchao's FP8 rowwise grouped GEMM can run the routed experts: torch's
    scaled grouped GEMM exists and the GPU is a Hopper (the kernel torch ships)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:
        from torchao.prototype.moe_training import (  # noqa: F401
            _to_fp8_rowwise_then_scaled_grouped_mm,
        )
    except ImportError:
        return False
    return True


def skipped(fqn: str, skip: Sequence[str]) -> str | None:
    """The entry of ``skip`` (training.fp8_skip) that names module ``fqn``: the whole
    name, or its last dotted parts ("attn.wkv_b" names layers.3.attn.wkv_b)."""
    return next((s for s in skip if fqn == s or fqn.endswith("." + s)), None)


def linear_filter(module: nn.Module, fqn: str) -> bool:
    """The nn.Linear modules that train in FP8 (unless training.fp8_skip names them:
    ``fp8_linears``): every one inside the transformer blocks and the MTP module whose
    widths are multiples of 16, never the output head."""
    if not isinstance(module, nn.Linear):
        return False
    if fqn == "output" or fqn.endswith(".output"):
        return False
    return module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0


def fp8_linears(model: nn.Module, skip: Sequence[str] = ()) -> set[str]:
    """The names of the linears of ``model`` that FP8 converts, leaving out those that
    ``skip`` names; an entry of ``skip`` that names none of the linears FP8 would convert
    is refused (InputError naming training.fp8_skip), being a typo or a stale name."""
    candidates = {name for name, m in model.named_modules() if linear_filter(m, name)}
    unused = [s for s in skip if not any(skipped(name, [s]) for name in candidates)]
    if unused:
        leaves = sorted({name.split(".", 2)[-1] if name.startswith("layers.") else name
                         for name in candidates})
        raise InputError(f"{', '.join(map(repr, unused))} names no linear that FP8 would "
                         f"convert; those are {', '.join(leaves)} (in every layer)",
                         field=SKIP_FIELD)
    return {name for name in candidates if not skipped(name, skip)}


def linear_config(recipe: str, fsdp: bool, emulate: bool = False):
    """torchao's Float8LinearConfig for ``recipe``; float8 all-gather under FSDP2 where
    torchao supports it (tensorwise scaling)."""
    _torchao()
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    changes = {}
    if fsdp and recipe == "tensorwise":
        changes["enable_fsdp_float8_all_gather"] = True
    if emulate:
        changes["emulate"] = True
    if changes:
        import dataclasses

        config = dataclasses.replace(config, **changes)
    return config


class Float8GroupedExperts(GroupedExperts):
    """GroupedExperts whose grouped GEMMs run in FP8 (rowwise scales, e4m3) through
    torchao; the same parameters, state dict and CPU path as GroupedExperts. Each expert's
    token group is padded to a multiple of 16 rows in a buffer of fixed size (about tokens
    + 16 x experts), so the shapes do not depend on the routing."""

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

        dtype = compute_dtype(x)
        x = x.to(dtype)
        n_experts = counts.numel()
        ends = torch.cumsum(counts, dim=0)
        starts = ends - counts
        padded = (counts + ALIGN - 1) // ALIGN * ALIGN
        padded_ends = torch.cumsum(padded, dim=0)
        padded_starts = padded_ends - padded
        rows = torch.arange(x.size(0), device=x.device)
        group = torch.searchsorted(ends, rows, right=True).clamp(max=n_experts - 1)
        dest = rows - starts[group] + padded_starts[group]
        # rows of the padded buffer, a multiple of 16 too: the weight gradient's GEMM reads
        # it transposed, with this many elements between rows
        capacity = (x.size(0) + ALIGN * n_experts + ALIGN - 1) // ALIGN * ALIGN
        x_pad = torch.index_copy(x.new_zeros(capacity, x.size(1)), 0, dest, x)
        offs = padded_ends.to(torch.int32)

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            # w: (experts, out, in) -> (experts, in, out), column-major as the kernel needs
            return _to_fp8_rowwise_then_scaled_grouped_mm(
                a, w.to(dtype).transpose(-2, -1), offs, torch.bfloat16, torch.float8_e4m3fn,
                pad_token_groups_for_grouped_mm=False)

        h = F.silu(mm(x_pad, self.w1)) * mm(x_pad, self.w3)
        return mm(h, self.w2).index_select(0, dest).to(dtype)


def apply_fp8(model: Transformer, recipe: str, device: torch.device, fsdp: bool = False,
              emulate: bool = False, grouped_experts: bool = False,
              skip: Sequence[str] = ()) -> dict[str, list[str]]:
    """Convert ``model`` in place for FP8 training with ``recipe`` and return what was
    converted: {"linear": [...], "grouped": [...], "bf16": [...]} by module name.
    ``grouped_experts`` also moves the routed experts to the FP8 grouped GEMM
    (Float8GroupedExperts); the trainer leaves it off, because on torch 2.11 with torchao
    0.18 that GEMM ran slower than the bf16 one at the shapes of small.toml and wide.toml
    (docs/benchmarks.md, bench/fp8_kernels.py). ``emulate`` (tests only) runs torchao's
    float8 arithmetic without FP8 hardware. ``skip`` (training.fp8_skip) names linears
    left in bf16."""
    if not emulate:
        check_support(recipe, device)
    elif recipe not in RECIPES:
        raise InputError(f"unknown FP8 recipe {recipe!r} (known: off, {', '.join(RECIPES)})",
                         field=FIELD)
    from torchao.float8 import convert_to_float8_training

    linears = fp8_linears(model, skip)
    config = linear_config(recipe, fsdp, emulate)
    convert_to_float8_training(model, config=config,
                               module_filter_fn=lambda m, fqn: fqn in linears)
    grouped = []
    if grouped_experts and not emulate and grouped_fp8_available(device):
        for name, module in model.named_modules():
            if type(module) is GroupedExperts and all(
                    w.size(-1) % ALIGN == 0 and w.size(-2) % ALIGN == 0
                    for w in (module.w1, module.w2, module.w3)):
                module.__class__ = Float8GroupedExperts
                grouped.append(name)
    kept = [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) and type(m) is nn.Linear)
            or type(m).__name__ == "Gate" or type(m) is GroupedExperts]
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"fp8 ({recipe}): {len(linears)} linears and {len(grouped)} grouped experts in "
              f"FP8; in bf16: {', '.join(kept) or 'nothing'}", flush=True)
    return {"linear": sorted(linears), "grouped": grouped, "bf16": kept}


def apply_fp8_options(model: Transformer, training: TrainingConfig, device: torch.device,
                      fsdp: bool = False) -> None:
    """``training.fp8_experts`` then ``training.fp8`` (each a recipe, or "off"; the
    config's [training]) on ``model``, in place: the routed experts move to FP8 first, so
    that torchao's conversion, which looks at nn.Linear modules only, finds the rest, less
    those that ``training.fp8_skip`` names."""
    if training.fp8_experts != "off":
        apply_fp8_experts(model, training.fp8_experts, device)
    if training.fp8 != "off":
        apply_fp8(model, training.fp8, device, fsdp=fsdp, skip=training.fp8_skip)
