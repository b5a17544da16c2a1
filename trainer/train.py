"""Entry point: python -m trainer.train --config FILE [--out DIR] [--steps N]

Runs under torchrun (process group from its environment: NCCL on GPU, gloo on CPU, the
device from LOCAL_RANK) or alone as one process. Rank 0 prints one line per step and
writes <out>/metrics.jsonl, <out>/config.json and, at the end, <out>/summary.json.
A run resumes from the newest complete checkpoint under <out>/checkpoints.
Exit codes: 0 done, 2 bad configuration (one line naming the field), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from trainer.config import InputError, TrainConfig, check_world_size, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.train",
                                     description="Train the bundled DeepSeek-style model.")
    parser.add_argument("--config", required=True, help="training config (TOML)")
    parser.add_argument("--out", help="run directory (default ./runs/<time>); a run "
                        "resumes from its newest complete checkpoint")
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.add_argument("--profile-step", type=int, metavar="N",
                        help="profile step N with torch.profiler: a Chrome trace per rank "
                        "in <out>/profile/, and rank 0 prints where the GPU time went")
    return parser.parse_args(argv)


def apply_overrides(cfg: TrainConfig, steps: int | None) -> None:
    if steps is None:
        return
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}", field="--steps")
    cfg.training.steps = steps
    cfg.training.warmup_steps = min(cfg.training.warmup_steps, steps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update of 0-based step ``step``: linear warmup
    over ``warmup`` steps, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def layout_suffix(dims, p) -> str:
    """The model-parallel part of the header line, e.g. ", tp 2, pp 2 (1f1b x 2)"."""
    parts = [f"tp {dims.tp}"] if dims.tp > 1 else []
    if dims.ep > 1:
        parts.append(f"ep {dims.ep}")
    if dims.pp > 1:
        parts.append(f"pp {dims.pp} ({p.pp_schedule} x {p.n_microbatches})")
    return "".join(", " + x for x in parts)


def init_distributed():
    """Process group from torchrun's environment, or a one-process group (no network)."""
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, device_id=device if use_cuda else None)
    return device


def choose_out_dir(requested: str | None) -> Path:
    """Rank 0 picks the directory (default by time) and every rank uses the same one."""
    import torch.distributed as dist

    box = [requested or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def build_optimizer(model, cfg: TrainConfig):
    import torch

    t = cfg.training
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # the fused CUDA kernel when every parameter is a plain CUDA tensor (one GPU, DDP);
    # sharded (DTensor) parameters keep the default multi-tensor implementation
    from torch.distributed.tensor import DTensor
    fused = all(p.is_cuda and not isinstance(p, DTensor) for p in decay + no_decay)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    return optimizer, scheduler


def profile_report(prof, step: int, elapsed: float, out_dir: Path, rank: int) -> None:
    """Write step ``step``'s trace and, on rank 0, print its kernel time by family."""
    from trainer.bench.step_profile import kernel_times

    trace_dir = out_dir / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_dir / f"step-{step}-rank-{rank}.json"))
    if rank != 0:
        return
    _kernels, by_family, busy_ms = kernel_times(prof)
    if not by_family:  # no accelerator kernels (CPU)
        print(f"profile of step {step}: {elapsed * 1e3:.1f} ms | trace in {trace_dir}",
              flush=True)
        return
    families = ", ".join(f"{name} {ms:.1f}" for name, ms in
                         sorted(by_family.items(), key=lambda kv: -kv[1]) if ms >= 0.05)
    print(f"profile of step {step}: {elapsed * 1e3:.1f} ms, kernels {busy_ms:.1f} ms "
          f"({100 * busy_ms / (elapsed * 1e3):.0f}%) | ms by family: {families} | "
          f"trace in {trace_dir}", flush=True)


def train(cfg: TrainConfig, out_dir: Path, device,
          profile_step: int | None = None) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from trainer import checkpoint
    from trainer.data import Loader, build_source
    from trainer.metrics import MetricsWriter, format_line, peak_flops, peak_memory_gib
    from trainer.model import ModelArgs, Transformer
    from trainer.parallel import ParallelDims, clip_grad_norm, parallelize
    from trainer.parallel.pipeline import Pipeline, split_model

    rank, world_size = dist.get_rank(), dist.get_world_size()
    t = cfg.training
    check_world_size(cfg, world_size)
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, p.ep, world_size)
    source = build_source(cfg, cfg.path)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    torch.manual_seed(t.seed)  # same initial weights on every rank
    args = ModelArgs.from_config(cfg.model)
    with torch.device(device):
        model = Transformer(args)
    n_params, n_active = model.num_params(), model.num_params(active_only=True)
    flops_per_token = model.flops_per_token(t.seq_len)
    # MoE layers by their index among all of the model's MoE layers: a pipeline stage
    # holds some of them, and the loads of all are summed over every rank at once
    moe_index = {name: i for i, name in enumerate(
        n for n, b in model.layers.items() if b.ffn in model.moe_layers())}
    n_moe = len(moe_index)
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())
    pipeline = None
    if dims.pp > 1:
        pp_rank = dims.pp_rank(device.type)
        split_model(model, dims.pp, pp_rank, seq_shards=dims.tp)
    moe_layers = {moe_index[n]: b.ffn for n, b in model.layers.items() if n in moe_index}
    train_module = parallelize(model, dims, device, t.activation_checkpoint, t.compile,
                               t.fp8)
    if dims.pp > 1:
        with autocast:
            pipeline = Pipeline(train_module, pp_rank, dims.submesh(device.type, "pp"), device,
                                p.pp_schedule, p.n_microbatches, t.grad_accum_steps,
                                (t.micro_batch_size, t.seq_len))
        pp_loads = {i: torch.zeros(args.n_routed_experts, dtype=torch.long, device=device)
                    for i in moe_layers}

        def count_load(moe, _inputs, _output) -> None:  # every pipeline micro-batch's routing
            pp_loads[moe.load_index].add_(moe.tokens_per_expert)

        for i, moe in moe_layers.items():
            moe.load_index = i
            moe.register_forward_hook(count_load)
    optimizer, scheduler = build_optimizer(model, cfg)
    loader = Loader(source, t.micro_batch_size, t.grad_accum_steps,
                    dims.dp_rank(device.type), dims.dp_degree, device)

    ckpt_root = out_dir / "checkpoints"
    start_step = 0
    resume = checkpoint.latest_step(ckpt_root)
    if resume is not None:
        state = checkpoint.load(ckpt_root, resume, model, optimizer, device)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
        start_step = state["step"]
        if rank == 0:
            print(f"resumed from {checkpoint.step_dir(ckpt_root, resume)}", flush=True)

    peak = peak_flops(device)
    tokens_per_step = loader.global_batch * t.seq_len
    writer = (MetricsWriter(out_dir, cfg.metrics.tensorboard, cfg.path,
                            resumed_from=start_step if resume is not None else None)
              if rank == 0 else None)
    if rank == 0:
        print(f"model: {n_params / 1e6:,.1f}M parameters, {n_active / 1e6:,.1f}M active | "
              f"world {world_size} ({dims.dp_replicate}x{dims.dp_shard} dp"
              f"{layout_suffix(dims, p)}) | "
              f"{'bf16' if use_bf16 else 'fp32'} on {device.type} | "
              f"{tokens_per_step:,} tokens/step", flush=True)

    history: list[dict[str, Any]] = []
    for step in range(start_step + 1, t.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prof = None
        if step == profile_step:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if device.type == "cuda" else [])
            prof = profile(activities=activities)
            prof.start()
        t0 = time.perf_counter()
        micro_batches = loader.next_step()
        loads = torch.zeros(n_moe, args.n_routed_experts, dtype=torch.long, device=device)
        sums = torch.zeros(2, device=device)  # lm loss, mtp loss (micro-batch means)
        for i, (inputs, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if pipeline is not None:  # the schedule handles FSDP's gradient sync itself
                with autocast:
                    loss = pipeline.step(inputs, targets)
                if loss is not None:
                    sums[0] += loss.float()
                continue
            sync = contextlib.nullcontext()
            if dims.ddp_enabled and not last:
                sync = train_module.no_sync()
            elif dims.fsdp_enabled:
                model.set_requires_gradient_sync(last)
            with sync:
                with autocast:
                    out = train_module(inputs, targets)
                (out.loss / len(micro_batches)).backward()
            sums += torch.stack([out.lm_loss.detach(), out.mtp_loss.detach()]).float()
            for j, moe in moe_layers.items():
                loads[j] += moe.tokens_per_expert
        if pipeline is not None:
            for j, acc in pp_loads.items():
                loads[j] += acc
                acc.zero_()
        sums /= len(micro_batches)
        grad_norm = (clip_grad_norm(list(model.parameters()), t.grad_clip,
                                    dims.submesh(device.type, "pp").get_group()
                                    if dims.pp > 1 else None)
                     if t.grad_clip > 0 else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if world_size > 1:  # with pp, only the last stage's ranks hold a loss
            dist.all_reduce(sums)
            sums /= world_size // dims.pp
        balance = None
        if n_moe:
            stacked = loads
            if world_size > 1:
                dist.all_reduce(stacked)
            for j, moe in moe_layers.items():
                moe.update_bias(stacked[j])
            balance = (stacked.max(dim=1).values.float() / stacked.float().mean(dim=1)).max()
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss, mtp_loss = sums.tolist()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if prof is not None:
            prof.stop()
            profile_report(prof, step, elapsed, out_dir, rank)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")

        tokens_per_s = tokens_per_step / elapsed
        per_device = tokens_per_s / world_size
        metrics = {
            "step": step, "loss": loss,
            "mtp_loss": mtp_loss if args.mtp_depth else None,
            "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
            "mfu": None if peak is None else per_device * flops_per_token / peak,
            "peak_mem_gib": peak_memory_gib(device),
            "max_expert_load_ratio": None if balance is None else float(balance),
            "step_time_s": elapsed,
        }
        history.append(metrics)
        if rank == 0:
            print(format_line(metrics, t.steps), flush=True)
            writer.write(metrics)

        if cfg.checkpoint.interval and (step % cfg.checkpoint.interval == 0 or step == t.steps):
            checkpoint.save(ckpt_root, step, model, optimizer,
                            {"step": step, "scheduler": scheduler.state_dict(),
                             "data": loader.state_dict()},
                            cfg.checkpoint.keep_last, device)

    timed = history[1:] or history  # the first step includes warm-up
    summary = {
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "steps": t.steps,
        "start_step": start_step,
        "tokens_per_s": (sum(m["tokens_per_s"] for m in timed) / len(timed)) if timed else None,
        "mfu": (sum(m["mfu"] for m in timed) / len(timed)) if timed and peak else None,
        "world_size": world_size,
        "params": n_params,
        "active_params": n_active,
        "config": cfg.path,
    }
    if rank == 0:
        writer.close()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        apply_overrides(cfg, args.steps)
    except InputError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    code = 0
    try:
        device = init_distributed()
        rank = dist.get_rank()
        train(cfg, choose_out_dir(args.out), device, args.profile_step)
    except InputError as exc:
        if rank == 0:
            print(f"error: {exc.message}", file=sys.stderr)
        code = 2
    except Exception:  # any rank reports its own failure, named, then the run stops
        print(f"[rank {rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        code = 1
    finally:
        # free DDP/FSDP state (and its communication threads) before the process group
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
