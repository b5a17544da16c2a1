"""Entry point: python -m trainer.train --config FILE [--out DIR] [--steps N] [--init-from CKPT]

Runs under torchrun (process group from its environment: NCCL on GPU, gloo on CPU, the
device from LOCAL_RANK) or alone as one process. Rank 0 prints one line per step and
writes <out>/metrics.jsonl, <out>/config.json and, at the end, <out>/summary.json.
A run resumes from the newest complete checkpoint under <out>/checkpoints; a run without
one starts from the model weights of --init-from (an imported release or another run's
checkpoint) when given, with a fresh optimizer at step 0.
Exit codes: 0 done, 2 bad configuration (one line naming the field), 1 anything else.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from trainer.config import (
    InputError,
    TrainConfig,
    check_fsdp_dtype,
    check_world_size,
    load_config,
    uses_bf16,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.train",
                                     description="Train the bundled DeepSeek-style model.")
    parser.add_argument("--config", required=True, help="training config (TOML)")
    parser.add_argument("--out", help="run directory (default ./runs/<time>); a run "
                        "resumes from its newest complete checkpoint")
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="where checkpoints go (default <out>/checkpoints)")
    parser.add_argument("--init-from", metavar="CKPT",
                        help="start from the model weights of this checkpoint (from "
                        "`python -m trainer.convert import`, or a run's checkpoints/step-N) "
                        "with a fresh optimizer at step 0; a run that has checkpoints of "
                        "its own resumes from them instead")
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


def resume(ckpt_root: Path, train_step, loader, device, rank: int) -> int | None:
    """Load the newest complete checkpoint under ``ckpt_root`` into the model, optimizer,
    schedule and data position; return its step, or None when there is none."""
    from trainer import checkpoint

    loaded = checkpoint.load_latest(ckpt_root, train_step.model, train_step.optimizer, device,
                                    say=lambda line: print(line, flush=True))
    if loaded is None:
        return None
    latest, state = loaded
    train_step.scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    if rank == 0:
        print(f"resumed from {checkpoint.step_dir(ckpt_root, latest)}", flush=True)
    return state["step"]


def summarize(history: list[dict[str, Any]], cfg: TrainConfig, start_step: int,
              world_size: int, n_params: int, n_active: int, peak: float | None
              ) -> dict[str, Any]:
    timed = history[1:] or history  # the first step includes warm-up
    return {
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "steps": cfg.training.steps,
        "start_step": start_step,
        "tokens_per_s": (sum(m["tokens_per_s"] for m in timed) / len(timed)) if timed else None,
        "mfu": (sum(m["mfu"] for m in timed) / len(timed)) if timed and peak else None,
        "world_size": world_size,
        "params": n_params,
        "active_params": n_active,
        "config": cfg.path,
    }


def train(cfg: TrainConfig, out_dir: Path, device, profile_step: int | None = None,
          init_from: str | None = None, checkpoint_dir: str | None = None,
          ledger: dict | None = None) -> dict[str, Any]:
    """Set up the model, its parallelism, optimizer and data on this rank, then run the
    steps (trainer/step.py) from the newest checkpoint on (without one: from the weights
    of ``init_from``, if given); return the run's summary."""
    import torch
    import torch.distributed as dist

    from trainer import checkpoint, resilience
    from trainer.data import Loader, build_source
    from trainer.jobstate import StatusFile, StopSignal, checkpoints_shared
    from trainer.metrics import MetricsWriter, format_line, peak_flops, peak_memory_gib
    from trainer.model import Transformer
    from trainer.parallel import ParallelDims
    from trainer.profiling import profile_report, start_profiler
    from trainer.readout import Figures, Readout
    from trainer.step import build_step

    rank, world_size = dist.get_rank(), dist.get_world_size()
    t, p = cfg.training, cfg.parallel
    check_world_size(cfg, world_size)
    check_fsdp_dtype(cfg, uses_bf16(t.dtype, device.type), device.type)
    attempt = resilience.agree_attempt(ledger, device)
    if attempt is not None and resilience.give_up(attempt.restarts,
                                                  attempt.policy.max_restarts):
        resilience.abort(f"the job was restarted {attempt.restarts} times since its newest "
                         f"checkpoint, more than --max-restarts {attempt.policy.max_restarts}")
    watch = resilience.NodeWatch.start(attempt)
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, p.ep, world_size)
    source = build_source(cfg, cfg.path)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    torch.manual_seed(t.seed)  # same initial weights on every rank
    with torch.device(device):
        model = Transformer(cfg.model)
    n_params, n_active = model.num_params(), model.num_params(active_only=True)
    flops_per_token = model.flops_per_token(t.seq_len)
    train_step = build_step(model, cfg, dims, device)
    loader = Loader(source, t.micro_batch_size, t.grad_accum_steps,
                    dims.dp_rank(device.type), dims.dp_degree, device)
    stop = StopSignal()  # before the slow part: a stop during set-up is kept
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    if cfg.checkpoint.interval and not checkpoints_shared(ckpt_root):
        # Each node holds only its ranks' shards: no node has a whole checkpoint.
        where = ("checkpoint.interval" if not checkpoint_dir else "--checkpoint-dir")
        if checkpoint.latest_step(ckpt_root) is not None:
            raise InputError(f"{ckpt_root} is not one directory shared by every node, so "
                             "no node holds a whole checkpoint to continue from; put "
                             "checkpoints on a shared file system (dsk_checkpoint_dir)",
                             file=cfg.path, field=where)
        if rank == 0:
            print(f"warning: {ckpt_root} is on each node's own disk: this job's "
                  "checkpoints cannot be resumed on several nodes (set dsk_checkpoint_dir "
                  "to a shared file system)", flush=True)
    resumed = resume(ckpt_root, train_step, loader, device, rank)
    start_step = resumed or 0
    if resumed is None and init_from:
        checkpoint.load_model(Path(init_from), train_step.model)
        if rank == 0:
            print(f"initialised from {init_from}", flush=True)

    peak = peak_flops(device)
    tokens_per_step = loader.global_batch * t.seq_len
    writer = (MetricsWriter(out_dir, cfg.metrics.tensorboard, cfg.path, resumed_from=resumed)
              if rank == 0 else None)
    if rank == 0:
        print(f"model: {n_params / 1e6:,.1f}M parameters, {n_active / 1e6:,.1f}M active | "
              f"world {world_size} ({dims.dp_replicate}x{dims.dp_shard} dp"
              f"{layout_suffix(dims, p)}) | "
              f"{'bf16' if uses_bf16(t.dtype, device.type) else 'fp32'} on {device.type} | "
              f"{tokens_per_step:,} tokens/step", flush=True)

    status = StatusFile(out_dir, t.steps, start_step) if rank == 0 else None
    if status is not None and attempt is not None:
        status.restarts(attempt.number - 1, attempt.restarts)
    if status is not None and resumed is not None:
        status.checkpoint(resumed)
    history: list[dict[str, Any]] = []

    def record(figures: Figures) -> bool:
        """A step read back: check its loss, keep, print and write its metrics; whether
        some rank was asked to stop during it."""
        if not math.isfinite(figures.loss):
            raise FloatingPointError(f"loss is {figures.loss} at step {figures.step}")
        per_device = tokens_per_step / figures.seconds / world_size
        metrics = {
            "step": figures.step, "loss": figures.loss,
            "mtp_loss": figures.mtp_loss if cfg.model.mtp_depth else None,
            "lr": figures.lr, "grad_norm": figures.grad_norm,
            "tokens_per_s": tokens_per_step / figures.seconds,
            "tokens_per_s_per_device": per_device,
            "mfu": None if peak is None else per_device * flops_per_token / peak,
            "peak_mem_gib": peak_memory_gib(device),
            "max_expert_load_ratio": figures.max_expert_load_ratio,
            "step_time_s": figures.seconds,
        }
        history.append(metrics)
        if rank == 0:
            print(format_line(metrics, t.steps), flush=True)
            writer.write(metrics)
            status.step(metrics)
        return figures.stop

    # Each step is read back once the next one is queued (trainer/readout.py), except
    # where the loop must act on it at once: a checkpoint, the last and the profiled step,
    # and a stop (seen one step late, so the job stops after the step that follows it).
    readout = Readout(device)
    pending = None  # the step queued before this one, not read yet
    stopping, stopped_at = False, None
    for step in range(start_step + 1, t.steps + 1):
        resilience.drill_crash(attempt, step)
        profiled = step == profile_step
        if profiled and pending is not None:
            stopping = record(pending.read()) or stopping
            pending = None
            readout.pause()
        if profiled and device.type == "cuda":
            torch.cuda.synchronize(device)
        prof = start_profiler(device.type) if profiled else None
        readout.begin()
        current = readout.end(step, train_step(loader.next_step()), stop.reduced(device))
        if pending is not None:
            stopping = record(pending.read()) or stopping
        pending = current
        due = bool(cfg.checkpoint.interval) and (step % cfg.checkpoint.interval == 0
                                                 or step == t.steps)
        if not (profiled or stopping or due or step == t.steps):
            continue
        figures, pending = pending.read(), None
        readout.pause()
        if prof is not None:
            prof.stop()
            profile_report(prof, step, figures.seconds, out_dir, rank)
        stopping = record(figures) or stopping
        if cfg.checkpoint.interval and (due or stopping):
            checkpoint.save(ckpt_root, step, train_step.model, train_step.optimizer,
                            {"step": step, "scheduler": train_step.scheduler.state_dict(),
                             "data": loader.state_dict()},
                            cfg.checkpoint.keep_last, device)
            if attempt is not None:  # the restart count starts again here
                resilience.checkpoint_written(attempt.number, step)
                attempt.checkpoint_attempt, attempt.restarts = attempt.number, 0
            if status is not None:
                status.checkpoint(step)
                if attempt is not None:
                    status.restarts(attempt.number - 1, 0)
        if stopping:
            stopped_at = step
            break
    stop.close()

    summary = summarize(history, cfg, start_step, world_size, n_params, n_active, peak)
    if rank == 0:
        writer.close()
        if stopped_at is None:
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        else:
            saved = "a checkpoint saved" if cfg.checkpoint.interval else "no checkpoint " \
                "(checkpoint.interval is 0)"
            print(f"stopped at step {stopped_at}: {saved}", flush=True)
        status.end("finished" if stopped_at is None else "stopped")
    dist.barrier()
    if watch is not None:
        watch.stop()
    return summary


def main(argv: list[str] | None = None) -> int:
    from trainer import jobstate, resilience

    jobstate.redirect_to_rank_log()
    ledger = resilience.begin_attempt()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        apply_overrides(cfg, args.steps)
        if args.init_from and not (Path(args.init_from) / ".metadata").is_file():
            raise InputError("not a checkpoint directory (no .metadata)",
                             file=args.init_from, field="--init-from")
    except InputError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2

    if jobstate.stop_already_requested():
        print("the job was asked to stop: not starting", flush=True)
        return 0

    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    code = 0
    try:
        device = init_distributed()
        rank = dist.get_rank()
        train(cfg, choose_out_dir(args.out), device, args.profile_step, args.init_from,
              args.checkpoint_dir, ledger)
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
