"""Our trainer against torchtitan's DeepSeek-V3 model on the same dimensions, one GPU.

Both runs happen in this call, one after the other, each in its own process (so neither
inherits the other's allocator or compiled kernels):

- ours: `python -m trainer.train` on the config with MTP off (torchtitan's DeepSeek-V3
  has no MTP) and the given micro-batch (bench/gpu_fp8.py runs it and reads its
  metrics.jsonl);
- torchtitan (0.2.2 on torch 2.11): its `DeepSeekV3Model` built from the same config's
  dimensions, through its own `parallelize_deepseekv3` on a one-GPU ParallelDims (no
  FSDP, so its parameters stay float32) with `compile.enable` for the model and the loss,
  the config's activation checkpointing mode, and bf16 autocast around forward and loss,
  as torchtitan's trainer does on one GPU (`maybe_enable_amp`). Its optimizer is fused
  AdamW with the config's learning rate, betas (0.9, 0.95), weight decay and gradient
  clipping; its auxiliary-loss-free expert bias is updated before every optimizer step
  the way its optimizer hook does. Tokens are uniform random (ours: its synthetic data);
  both models run the same FLOPs per token, so MFU uses our count for both.

    python bench/torchtitan_side_by_side.py --config small --micro-batch 16 \
        --steps 30 --out side_by_side.json

Every setting handed to torchtitan is written into the output's "torchtitan" row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from gpu_fp8 import config_path, run_one  # noqa: E402


def _ac_mode(ours: str) -> str:
    return {"none": "none", "full": "full"}.get(ours, "selective")


def torchtitan_settings(config: Path, micro_batch: int) -> dict:
    """What torchtitan is given, from our config: model arguments and job settings."""
    from trainer.config import load_config

    cfg = load_config(config)
    m, t = cfg.model, cfg.training
    model = {
        "vocab_size": m.vocab_size, "dim": m.dim, "inter_dim": m.inter_dim,
        "moe_inter_dim": m.moe_inter_dim, "n_layers": m.n_layers,
        "n_dense_layers": m.n_dense_layers, "n_heads": m.n_heads,
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim, "rope_theta": m.rope_theta,
        "max_seq_len": t.seq_len,
        # YaRN stays off, as in our model: torchtitan turns it on when max_seq_len
        # exceeds original_seq_len.
        "original_seq_len": t.seq_len,
        "attn_type": "sdpa", "attn_mask_type": "causal",
    }
    moe = {
        "num_experts": m.n_routed_experts, "num_shared_experts": m.n_shared_experts,
        "score_func": m.score_func, "route_norm": m.score_func == "sigmoid",
        "route_scale": m.route_scale, "top_k": m.n_activated_experts,
        "use_grouped_mm": True, "load_balance_coeff": m.bias_update_speed or None,
    }
    job = {
        "training.seq_len": t.seq_len, "training.local_batch_size": micro_batch,
        "training.mixed_precision_param": "bfloat16", "compile.enable": t.compile,
        "compile.components": ["model", "loss"],
        "activation_checkpoint.mode": _ac_mode(t.activation_checkpoint),
        "optimizer": {"name": "AdamW", "implementation": "fused", "lr": t.lr,
                      "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": t.weight_decay},
        "max_norm": t.grad_clip, "parallel_dims": "world 1 (no FSDP, TP, EP or PP)",
        "autocast": "bfloat16 around forward and loss",
    }
    flops = _flops_per_token_without_mtp(cfg, t.seq_len)
    return {"model": model, "moe": moe, "job": job, "flops_per_token": flops,
            "seed": t.seed}


def _flops_per_token_without_mtp(cfg, seq_len: int) -> float:
    from trainer.model.model import count_params, flops_per_token

    args = dataclasses.replace(cfg.model, mtp_depth=0)
    return flops_per_token(args, seq_len, count_params(args, active_only=True))


def torchtitan_worker(config: Path, micro_batch: int, steps: int, skip: int) -> dict:
    import torch
    import torchtitan
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.deepseek_v3.infra.parallelize import parallelize_deepseekv3
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.moe import MoEArgs

    from trainer.metrics import peak_flops, peak_memory_gib

    s = torchtitan_settings(config, micro_batch)
    torch.manual_seed(s["seed"])
    device = torch.device("cuda")
    args = DeepSeekV3ModelArgs(**s["model"], moe_args=MoEArgs(**s["moe"]))
    job = JobConfig()
    job.training.seq_len = s["job"]["training.seq_len"]
    job.training.local_batch_size = micro_batch
    job.training.mixed_precision_param = "bfloat16"
    job.compile.enable = s["job"]["compile.enable"]
    job.compile.components = list(s["job"]["compile.components"])
    job.activation_checkpoint.mode = s["job"]["activation_checkpoint.mode"]
    # as torchtitan's trainer does: sets max_seq_len, the MoE backend (moe_impl), grouped GEMMs
    args.update_from_config(job)
    with torch.device(device):
        model = DeepSeekV3Model(args)
    with torch.no_grad():  # as torchtitan's trainer initialises it
        model.init_weights(buffer_device=device)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1,
                        world_size=1)
    model = parallelize_deepseekv3(model, dims, job)
    model.train()
    loss_fn = build_cross_entropy_loss(job)
    opt = s["job"]["optimizer"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]),
                                  eps=opt["eps"], weight_decay=opt["weight_decay"],
                                  fused=True)
    moes = [block.moe for block in model.layers.values() if block.moe_enabled]

    def update_expert_bias() -> None:
        with torch.no_grad():
            for moe in moes:
                if moe.load_balance_coeff is None:
                    continue
                counts = moe.tokens_per_expert.float()
                delta = moe.load_balance_coeff * torch.sign(counts.mean() - counts)
                moe.expert_bias.add_(delta - delta.mean())
                moe.tokens_per_expert.zero_()

    seq = s["job"]["training.seq_len"]
    gen = torch.Generator(device=device).manual_seed(s["seed"])
    batches = [torch.randint(0, args.vocab_size, (micro_batch, seq + 1), device=device,
                             generator=gen) for _ in range(4)]
    torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for step in range(steps):
        tokens = batches[step % len(batches)]
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
            loss = loss_fn(logits, tokens[:, 1:]) / tokens[:, 1:].numel()
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["job"]["max_norm"], foreach=True)
        update_expert_bias()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        rows.append({"step": step + 1, "loss": loss_value, "step_time_s": elapsed,
                     "tokens_per_s": micro_batch * seq / elapsed})
        print(json.dumps(rows[-1]), flush=True)
    timed = rows[skip:] or rows
    tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
    peak = peak_flops(device)
    return {"run": "torchtitan", "ok": True, "torchtitan": torchtitan.__version__,
            "settings": s, "tokens_per_s": tps,
            "mfu": tps * s["flops_per_token"] / peak if peak else None,
            "step_time_s": sum(r["step_time_s"] for r in timed) / len(timed),
            "peak_mem_gib": peak_memory_gib(device), "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"], "losses": [r["loss"] for r in rows]}


def run_torchtitan(config: Path, micro_batch: int, steps: int, skip: int,
                   timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", str(config),
           "--micro-batch", str(micro_batch), "--steps", str(steps), "--skip", str(skip)]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"run": "torchtitan", "ok": False, "error": f"timed out after {timeout:.0f} s\n"
                f"{out[-3000:]}"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"run"')]
    if proc.returncode != 0 or not lines:
        return {"run": "torchtitan", "ok": False,
                "error": (proc.stdout + proc.stderr)[-4000:]}
    row = json.loads(lines[-1])
    row["wall_s"] = round(time.monotonic() - started, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small",
                        help="a config under trainer/configs, without .toml")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5,
                        help="steps left out of the means (compilation, warm-up)")
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--only", choices=["ours", "torchtitan"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("side_by_side.json"))
    args = parser.parse_args()
    config = config_path(args.config)
    if args.worker:
        print(json.dumps(torchtitan_worker(config, args.micro_batch, args.steps, args.skip)))
        return 0

    import torch

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    rows = []
    overrides = {"model.mtp_depth": 0, "training.micro_batch_size": args.micro_batch,
                 "training.grad_accum_steps": 1}
    if args.only != "torchtitan":
        with __import__("tempfile").TemporaryDirectory(prefix="dsk-side-") as tmp:
            ours = run_one(f"{args.config}:off", overrides, args.steps, args.skip, Path(tmp),
                           args.timeout)
        ours["run"] = "ours"
        rows.append(ours)
        print(json.dumps({k: v for k, v in ours.items() if k != "losses"}), flush=True)
    if args.only != "ours":
        theirs = run_torchtitan(config, args.micro_batch, args.steps, args.skip, args.timeout)
        rows.append(theirs)
        print(json.dumps({k: v for k, v in theirs.items() if k != "losses"}), flush=True)
    args.out.write_text(json.dumps({"versions": versions, "config": str(config),
                                    "micro_batch": args.micro_batch, "steps": args.steps,
                                    "skip": args.skip, "rows": rows}, indent=1) + "\n")
    print(f"versions: {versions}")
    print("| trainer | tokens/s | MFU | peak GiB | loss at last step |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if not r["ok"]:
            print(f"| {r['run']} | failed | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} "
              f"| {r['last_loss']:.4f} |")
    ok = [r for r in rows if r["ok"]]
    if len(ok) == 2:
        print(f"ours / torchtitan: {ok[0]['tokens_per_s'] / ok[1]['tokens_per_s']:.2f}x")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
