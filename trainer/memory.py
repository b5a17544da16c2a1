"""How much GPU memory one rank of a training run needs, estimated from the config.

    python -m trainer.memory --config C [--gpus N] [--gpu-memory GiB]

What the trainer keeps, per rank (trainer/step.py, trainer/optim.py, trainer/parallel/):

- parameters in fp32: the model is built in fp32 and bf16 autocast casts in each matmul,
  so the fp32 parameters are also the master weights; no separate bf16 copy is kept;
- gradients in fp32, the parameters' dtype; they are set to None after each update, so a
  step without accumulation (and without pipeline micro-batches) holds none of them at
  its activation peak, at the end of the forward;
- AdamW's two moments in fp32 (8 bytes per parameter), or bf16 with
  training.moments_dtype = "bfloat16" (4 bytes);
- FSDP2 (dp_shard > 1) shards all three over dp_shard and gathers one group's fp32
  parameters at a time (a block; with ep > 1 a MoE block's routed experts are a group
  of their own), the next one prefetched, or the next parallel.fsdp_prefetch ones, and
  one group's unsharded gradients before their reduce-scatter (every group's until its
  backward without resharding after forward; in bf16 with
  parallel.fsdp_param_dtype = "bfloat16", when autocast keeps no copies), and the root's
  own parameters (embedding, final norm, head), which FSDP2 keeps gathered from the
  forward to the backward; tp shards everything but the routed experts, which it
  replicates (ep shards those); DDP keeps full replicas and a bucket copy of the
  gradients;
- activations, per token of a micro-batch (``activation_bytes_per_token``): what
  autograd saves in each block for backward under torch.compile (bf16 matmul inputs and
  outputs, among them the SwiGLU products that w2's backward reads, the attention's q,
  k, v (a view of the whole kv projection), output and log-sum-exp, the router's bf16
  input and logits; measured on the CPU with saved-tensor hooks, docs/trainer.md),
  with "selective" checkpointing the block input and the matmul and attention outputs
  only, with "full" only the block input (one block is recomputed at a time); plus the
  output head's bf16 logits, or the gradient the head's loss op writes over them (and
  with MTP its block and a second head); tp divides them
  all (sequence parallelism); a pipeline stage keeps its own layers' activations for
  the pipeline micro-batches in flight (1F1B: up to pp - stage of them, GPipe: all);
- a backward working set: the head's logits gradient where the loss is not the one op
  (dsk::head_loss: a tensor-parallel or pipelined head), and one block's recomputed
  activations under checkpointing.

Two constants are fitted to peaks measured on one H200 (docs/benchmarks.md; the fit and
its error are in docs/trainer.md): ``ACTIVATION_SCALE`` multiplies the counted
activations (temporaries that the count leaves out, the allocator's rounding), and
``OVERHEAD_GIB`` is what a rank holds besides (CUDA context and workspaces, compiled
graphs, NCCL buffers).

Free of torch: the control node refuses a layout that cannot fit before any connection.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from trainer.config import TrainConfig, load_config, resolve_degrees
from trainer.model.args import ModelArgs

GIB = 2**30
FP8, BF16, FP32 = 1, 2, 4
# Fitted to the one-H200 peaks of the current code in docs/benchmarks.md (docs/trainer.md).
ACTIVATION_SCALE = 0.93
OVERHEAD_GIB = 0.5
CHECKPOINT_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """What decides the memory of one rank: the degrees and the micro-batch."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    activation_checkpoint: str
    n_microbatches: int  # pipeline micro-batches per training micro-batch
    schedule: str
    compile: bool
    loss_chunk: int = 0  # training.loss_chunk_tokens
    fsdp_reshard: bool = True  # parallel.fsdp_reshard_after_forward
    fsdp_bf16: bool = False  # parallel.fsdp_bf16
    fsdp_prefetch: int = 0  # parallel.fsdp_prefetch
    fp8_experts: bool = False  # training.fp8_experts is not "off"
    moment_bytes: int = FP32  # training.moments_dtype: bytes of each of AdamW's moments
    # The head's loss as one op (dsk::head_loss) wherever it is not chunked; False counts
    # the code before it, which the fitted constants' peaks were measured with.
    head_loss_op: bool = True

    @property
    def plain_head(self) -> bool:
        """Whether Transformer.head_loss computes the loss of a plain head: not a
        tensor-parallel one, and not a pipeline's last stage, which computes its own."""
        return self.tp == 1 and self.pp == 1

    @property
    def chunked_loss(self) -> bool:
        """Whether the head's loss runs chunk by chunk (training.loss_chunk_tokens)."""
        return self.plain_head and self.loss_chunk > 0

    @property
    def fused_loss(self) -> bool:
        """Whether the head's loss is the one op, ``dsk::head_loss``, which writes the
        logits' gradient over the logits in forward: a plain head, not chunked."""
        return self.plain_head and self.head_loss_op and self.loss_chunk == 0

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    def describe(self) -> str:
        parts = [f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}: dp_shard {self.dp_shard}"]
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate {self.dp_replicate}")
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) > 1:
                parts.append(f"{name} {getattr(self, name)}")
        parts.append(f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation")
        parts.append(f"activation checkpointing {self.activation_checkpoint}")
        return ", ".join(parts)


def layout_of(cfg: TrainConfig, gpus: int) -> Layout:
    """The config's layout on ``gpus`` ranks (dp_shard -1 resolved). Raises the config's
    DegreeError when the degrees do not fit."""
    p, t = cfg.parallel, cfg.training
    dp_shard = resolve_degrees(p.dp_replicate, p.dp_shard, p.tp, p.pp, p.ep, gpus)
    return Layout(p.dp_replicate, dp_shard, p.tp, p.pp, p.ep, t.micro_batch_size,
                  t.grad_accum_steps, t.seq_len, t.activation_checkpoint, p.n_microbatches,
                  p.pp_schedule, t.compile, t.loss_chunk_tokens,
                  p.fsdp_reshard_after_forward, p.fsdp_bf16, p.fsdp_prefetch,
                  t.fp8_experts != "off", BF16 if t.moments_dtype == "bfloat16" else FP32)


# --------------------------------------------------------------------------- parameters


def attention_params(m: ModelArgs) -> int:
    d = m.dim
    if m.q_lora_rank == 0:
        q = d * m.n_heads * m.qk_head_dim
    else:
        q = d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * m.n_heads * m.qk_head_dim
    return (q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            + m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
            + m.n_heads * m.v_head_dim * d + 2 * d)  # with the block's two norms


def block_params(m: ModelArgs, moe: bool) -> tuple[int, int]:
    """(parameters outside the routed experts, routed expert parameters) of one block."""
    if not moe:
        return attention_params(m) + 3 * m.dim * m.inter_dim, 0
    shared = 3 * m.dim * m.moe_inter_dim * m.n_shared_experts
    return (attention_params(m) + m.n_routed_experts * m.dim + shared,
            m.n_routed_experts * 3 * m.dim * m.moe_inter_dim)


def fsdp_groups(block: tuple[int, int], lay: Layout) -> list[float]:
    """The unsharded parameter counts of a block's FSDP groups on one GPU: the block
    whole, or with ep > 1 (the routed experts a group of their own) the block without
    its experts, then its experts (tp shards the first, ep the second)."""
    dense, experts = block[0] / lay.tp, block[1] / lay.ep
    return [dense, experts] if lay.ep > 1 and experts else [dense + experts]


def mtp_params(m: ModelArgs) -> tuple[int, int]:
    dense, experts = block_params(m, moe=True)
    return dense + 2 * m.dim + 2 * m.dim * m.dim + m.dim, experts


# --------------------------------------------------------------------------- activations


def attention_activation_bytes(m: ModelArgs, mode: str) -> float:
    """Bytes one block's attention saves for backward per token (bf16 unless noted)."""
    d, h = m.dim, m.n_heads
    qk, v = m.qk_head_dim, m.v_head_dim
    if mode == "full":
        return BF16 * d  # the block's input; the rest is recomputed
    lse = FP32 * h
    if mode == "selective":  # the block input and the outputs of matmuls and attention
        q_lora = BF16 * m.q_lora_rank if m.q_lora_rank else 0
        return (BF16 * (d + h * qk + m.kv_lora_rank + m.qk_rope_head_dim
                        + h * (m.qk_nope_head_dim + v) + h * v + d) + lse + q_lora)
    q_lora = 2 * BF16 * m.q_lora_rank if m.q_lora_rank else 0
    return (BF16 * (2 * d                                       # input, normed input
                    + 2 * h * qk + 2 * h * v                    # q, k, v, output
                    + h * m.qk_nope_head_dim                    # v is a view of all of kv
                    + m.kv_lora_rank + m.qk_rope_head_dim       # the latent
                    + m.kv_lora_rank)                           # the normed latent
            + lse + q_lora)


def ffn_activation_bytes(m: ModelArgs, moe: bool, mode: str, compile: bool) -> float:
    """Bytes one block's feed-forward saves for backward per token."""
    d = m.dim
    if mode == "full":
        return 0.0  # the block's input is counted with its attention
    if not moe:
        hidden = m.inter_dim
        if mode == "selective":
            return BF16 * (2 * hidden + d)
        return BF16 * (2 * d + 3 * hidden) + (0 if compile else BF16 * hidden)
    k, hidden = m.n_activated_experts, m.moe_inter_dim
    shared = m.n_shared_experts * hidden
    scores = FP32 * m.n_routed_experts
    if mode == "selective":
        return (scores + BF16 * (2 * k * hidden + k * d)
                + (BF16 * (2 * shared + d) if shared else 0))
    out = (BF16 * (3 * d                 # input, normed input, the router's copy of it
                   + m.n_routed_experts  # the router's logits
                   + k * d               # the tokens in expert order
                   + 3 * k * hidden      # w1|w3 outputs and the SwiGLU's (w2's input)
                   + k * d               # expert outputs, for the routing weights' grads
                   + 3 * shared))        # the same three of the shared experts
    if not compile:  # eager keeps silu(w1 x) of the shared experts too
        out += BF16 * shared
    return out


def head_activation_bytes(m: ModelArgs) -> float:
    """The output head per token: the normed input (bf16), the final norm's fp32 input and
    output (the norm runs outside the compiled head), the logits in bf16 as the compiled
    loss keeps them (it computes the fp32 cross-entropy from them again in backward; the
    loss op keeps their gradient in the same bytes instead), the loss's lse."""
    return BF16 * m.dim + BF16 * m.vocab_size + 2 * FP32 * m.dim + 2 * FP32


def mtp_extra_activation_bytes(m: ModelArgs) -> float:
    """MTP besides its block and its head: the target embeddings, both norms, eh_proj."""
    return BF16 * (m.dim + 2 * m.dim + 2 * m.dim + m.dim)


# --------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    layout: Layout
    stage: int  # the pipeline stage that needs the most
    items: dict[str, float]  # bytes per rank, by what holds them

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def table(self) -> str:
        width = max(len(k) for k in self.items)
        lines = [f"{name:<{width}}  {value / GIB:8.2f} GiB" for name, value in self.items.items()]
        lines.append(f"{'total':<{width}}  {self.total_gib:8.2f} GiB")
        return "\n".join(lines)


def stage_layers(n_layers: int, pp: int, stage: int) -> list[int]:
    """As trainer.parallel.pipeline.stage_layers (which needs torch to import)."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return list(range(start, start + base + (1 if stage < extra else 0)))


def _stage_estimate(m: ModelArgs, lay: Layout, stage: int) -> dict[str, float]:
    first, last = stage == 0, stage == lay.pp - 1
    layers = stage_layers(m.n_layers, lay.pp, stage)
    blocks = [block_params(m, i >= m.n_dense_layers) for i in layers]
    if last and m.mtp_depth:
        blocks.append(mtp_params(m))
    # the root's own parameters: this stage's embedding, and final norm and head
    embedding = m.vocab_size * m.dim if first else 0
    root = embedding + (m.vocab_size * m.dim + m.dim if last else 0)
    dense = sum(b[0] for b in blocks) + root
    experts = sum(b[1] for b in blocks)
    fsdp = lay.dp_shard > 1
    shard = lay.dp_shard if fsdp else 1
    # tp shards all but the routed experts; ep shards those (then FSDP over dp_shard / ep)
    local = dense / lay.tp / shard + experts / shard
    items = {"parameters (fp32)": FP32 * local,
             "gradients (fp32)": FP32 * local,
             f"optimizer state (AdamW, {'fp32' if lay.moment_bytes == FP32 else 'bf16'})":
                 2 * lay.moment_bytes * local}
    if fsdp:
        # one FSDP group gathered and the next prefetched (parallel.fsdp_prefetch N: the
        # next N, in trainer.parallel.apply.fsdp_order's order, where with ep > 1 each MoE
        # block's routed experts are a group after their block; without resharding after
        # forward, every group stays gathered until its backward), and one group's
        # unsharded gradients before their reduce-scatter (in bf16, then cast to fp32)
        unsharded = [g for b in blocks for g in fsdp_groups(b, lay)]
        largest = max(unsharded, default=0)
        ahead = max(1, min(lay.fsdp_prefetch, len(unsharded) - 1))
        gathered = (max((sum(unsharded[i:i + 1 + ahead]) for i in range(len(unsharded))),
                        default=0) if lay.fsdp_reshard else sum(unsharded))
        param_bytes, grad_bytes = (BF16, BF16 + FP32) if lay.fsdp_bf16 else (FP32, FP32)
        items[f"FSDP gathered blocks ({'bf16' if lay.fsdp_bf16 else 'fp32'})"] = (
            param_bytes * gathered + grad_bytes * largest)
        # FSDP2 never reshards the root after forward: its own parameters stay gathered
        # until its backward
        items[f"FSDP gathered root ({'bf16' if lay.fsdp_bf16 else 'fp32'})"] = (
            param_bytes * root / lay.tp)
    elif lay.dp_replicate > 1:
        items["DDP gradient buckets (fp32)"] = FP32 * local

    # autocast's bf16 copies of the weights, which each matmul saves for its backward:
    # of every block (gathered, so unsharded by FSDP) unless the blocks recompute, and
    # of the output head, which is never checkpointed. The FP8 routed experts
    # (training.fp8_experts) save their e4m3 copy instead, for the input gradients (of
    # every block, or of the one recomputed), and in the backward hold one transposed
    # copy of w1|w3 (two thirds of a block's experts) at a time
    head = m.vocab_size * m.dim * (1 + m.mtp_depth) if last else 0
    copied = [(b[0], 0 if lay.fp8_experts else b[1]) for b in blocks]
    if fsdp and lay.fsdp_bf16:
        cast = 0  # gathered in bf16: autocast has nothing to cast, backward re-gathers
    elif lay.activation_checkpoint == "none":
        cast = (dense - embedding) / lay.tp + sum(b[1] for b in copied) / lay.ep
    else:
        cast = head / lay.tp + max((sum(fsdp_groups(b, lay)) for b in copied), default=0)
    items["bf16 weight copies (autocast)"] = BF16 * cast
    if lay.fp8_experts:
        one_block = max((b[1] for b in blocks), default=0)
        saved = (sum(b[1] for b in blocks) if lay.activation_checkpoint == "none"
                 else one_block)
        items["FP8 copies of the routed experts"] = FP8 * (saved + 2 * one_block / 3) / lay.ep

    # tokens of one pipeline micro-batch, and how many a stage keeps at once
    tokens = lay.micro_batch * lay.seq_len / (lay.n_microbatches if lay.pp > 1 else 1)
    in_flight = 1
    if lay.pp > 1:
        in_flight = (lay.n_microbatches if lay.schedule == "gpipe"
                     else min(lay.n_microbatches, lay.pp - stage))
    mode = lay.activation_checkpoint
    per_token = sum(attention_activation_bytes(m, mode)
                    + ffn_activation_bytes(m, i >= m.n_dense_layers, mode, lay.compile)
                    for i in layers)
    block_full = (attention_activation_bytes(m, "none")
                  + ffn_activation_bytes(m, True, "none", lay.compile))
    working = 0.0
    head_chunks = 0.0
    if last:
        heads = 1 + m.mtp_depth
        per_token += heads * head_activation_bytes(m)
        if not lay.fused_loss:
            # the logits' gradient, beside the logits backward read it from; the op keeps
            # the gradient in their place (counted as the head's activations)
            working += BF16 * m.vocab_size
        if lay.chunked_loss:
            # Measured on one H200, chunks save less than the fp32 logits the count above
            # holds (the compiled whole loss keeps less than that): take off a bf16 copy
            # of the logits per head, and add each head's fp32 weight gradient and one
            # chunk's fp32 logits, exponentials and bf16 gradient. Errs high.
            per_token -= heads * BF16 * m.vocab_size
            head_chunks = (heads * FP32 * m.vocab_size * m.dim
                           + min(lay.loss_chunk, tokens) * m.vocab_size * (2 * FP32 + BF16))
        if m.mtp_depth:
            per_token += (mtp_extra_activation_bytes(m) + attention_activation_bytes(m, mode)
                          + ffn_activation_bytes(m, True, mode, lay.compile))
    if mode != "none":
        working += block_full  # one block recomputed in backward
    scale = ACTIVATION_SCALE / lay.tp
    items["activations"] = scale * per_token * tokens * in_flight
    items["backward working set"] = scale * working * tokens + head_chunks
    # Gradients exist at the activation peak (the end of a forward) only when earlier
    # micro-batches (or pipeline micro-batches) left theirs; otherwise backward frees
    # activations faster than gradients arrive, and the other peak is after backward:
    # every gradient, no activation.
    if lay.grad_accum == 1 and lay.pp == 1:
        transient = items["activations"] + items["backward working set"]
        if transient >= items["gradients (fp32)"]:
            items["gradients (fp32)"] = 0.0
        else:
            items["activations"] = items["backward working set"] = 0.0
    items["CUDA context, workspaces, compiled graphs"] = OVERHEAD_GIB * GIB
    return items


def estimate(cfg: TrainConfig, gpus: int | None = None, layout: Layout | None = None
             ) -> Estimate:
    """The estimate for ``cfg`` on ``gpus`` ranks, or for ``layout`` (then ``gpus`` is
    ignored): the pipeline stage that needs the most."""
    lay = layout or layout_of(cfg, gpus or 1)
    best = None
    for stage in range(lay.pp):
        items = _stage_estimate(cfg.model, lay, stage)
        if best is None or sum(items.values()) > sum(best[1].values()):
            best = (stage, items)
    assert best is not None
    return Estimate(lay, best[0], best[1])


# --------------------------------------------------------------------------- fitting


def _halvings(value: int) -> list[int]:
    out = [value]
    while out[-1] % 2 == 0 and out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def candidates(lay: Layout, max_gpus_factor: int = 8) -> list[tuple[int, Layout]]:
    """Layouts near ``lay`` with the same global batch, each with its distance: stronger
    activation checkpointing, a smaller micro-batch with more accumulation, more FSDP
    shards (more GPUs)."""
    out = []
    modes = CHECKPOINT_MODES[CHECKPOINT_MODES.index(lay.activation_checkpoint):]
    for mode in modes:
        for mb_step, mb in enumerate(_halvings(lay.micro_batch)):
            if lay.pp > 1 and mb % lay.n_microbatches:
                continue
            factor = 1
            gpu_step = 0
            while factor <= max_gpus_factor:
                new = dataclasses.replace(
                    lay, activation_checkpoint=mode, micro_batch=mb,
                    grad_accum=lay.grad_accum * (lay.micro_batch // mb),
                    dp_shard=lay.dp_shard * factor)
                if new != lay:
                    # more GPUs cost most; then full recomputation (about a third more
                    # compute); each halving of the micro-batch; selective recomputation
                    recompute = {"none": 0, "selective": 5, "full": 25}[mode] - \
                        {"none": 0, "selective": 5, "full": 25}[lay.activation_checkpoint]
                    out.append((100 * gpu_step + 10 * mb_step + recompute, new))
                factor *= 2
                gpu_step += 1
    return sorted(out, key=lambda x: x[0])


def nearest_fit(cfg: TrainConfig, lay: Layout, capacity_gib: float) -> Estimate | None:
    """The nearest layout (see candidates) whose estimate fits ``capacity_gib``."""
    for _, new in candidates(lay):
        if new.ep > 1 and new.dp_shard % new.ep:
            continue
        est = estimate(cfg, layout=new)
        if est.total_gib <= capacity_gib:
            return est
    return None


def layout_changes(old: Layout, new: Layout) -> str:
    """What to change in the config (and the cluster) to go from ``old`` to ``new``."""
    changes = []
    if new.activation_checkpoint != old.activation_checkpoint:
        changes.append(f'training.activation_checkpoint = "{new.activation_checkpoint}"')
    if new.micro_batch != old.micro_batch:
        changes.append(f"training.micro_batch_size = {new.micro_batch}, "
                       f"training.grad_accum_steps = {new.grad_accum}")
    if new.dp_shard != old.dp_shard:
        changes.append(f"{new.gpus} GPUs (dp_shard {new.dp_shard})")
    return "; ".join(changes)


def check_fits(cfg: TrainConfig, gpus: int, capacity_gib: float) -> Estimate:
    """The estimate for ``cfg`` on ``gpus`` GPUs of ``capacity_gib`` each; raises
    InputError (the config's file, the estimate, and the nearest layout that fits) when
    it exceeds the capacity."""
    from trainer.config import InputError

    est = estimate(cfg, gpus)
    if est.total_gib <= capacity_gib:
        return est
    near = nearest_fit(cfg, est.layout, capacity_gib)
    stage = f" (pipeline stage {est.stage})" if est.layout.pp > 1 else ""
    message = (f"the layout needs about {est.total_gib:.1f} GiB per GPU{stage}, more than "
               f"the GPUs' {capacity_gib:g} GiB ({est.layout.describe()}):\n"
               + "\n".join("  " + line for line in est.table().splitlines()))
    if near is not None:
        hint = (f"nearest layout that fits: {layout_changes(est.layout, near.layout)} "
                f"(about {near.total_gib:.1f} GiB per GPU); estimate any layout with "
                f"python -m trainer.memory --config {cfg.path}")
    else:
        hint = "no nearby layout fits: use tp, pp or ep, or GPUs with more memory"
    raise InputError(message, file=cfg.path or None, field="training.micro_batch_size",
                     hint=hint)


# --------------------------------------------------------------------------- command line


def default_gpus(cfg: TrainConfig) -> int:
    """The smallest world the config's degrees allow (dp_shard -1 counted as 1)."""
    p = cfg.parallel
    return p.dp_replicate * max(p.dp_shard, p.ep, 1) * p.tp * p.pp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.memory",
                                     description="GPU memory per rank for a training config.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, default=None,
                        help="world size (default: the smallest the config's degrees allow)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                        help="each GPU's memory: say whether the layout fits, and if not, "
                             "the nearest layout that does")
    args = parser.parse_args(argv)
    from trainer.config import DegreeError, InputError

    try:
        cfg = load_config(args.config)
        gpus = args.gpus or default_gpus(cfg)
        est = estimate(cfg, gpus)
    except (InputError, DegreeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stage = f", pipeline stage {est.stage}" if est.layout.pp > 1 else ""
    print(f"{args.config}: {est.layout.describe()}{stage}, per GPU:")
    print(est.table())
    if args.gpu_memory is None:
        return 0
    if est.total_gib <= args.gpu_memory:
        print(f"fits {args.gpu_memory:g} GiB")
        return 0
    near = nearest_fit(cfg, est.layout, args.gpu_memory)
    if near is None:
        print(f"does not fit {args.gpu_memory:g} GiB; no nearby layout does")
    else:
        print(f"does not fit {args.gpu_memory:g} GiB; nearest layout that fits: "
              f"{layout_changes(est.layout, near.layout)} ({near.total_gib:.1f} GiB)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
