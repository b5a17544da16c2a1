"""A DeepSeek-V3-style decoder: MLA attention, DeepSeekMoE FFN, optional MTP.

Plain single-device PyTorch, read top to bottom: RMSNorm, RoPE, MLA, MLP, Gate,
GroupedExperts, MoE, Block, MTP, Transformer (ModelArgs, the dimensions, live in args.py,
free of torch). There is no parallelism in here: data, tensor, expert and pipeline
parallelism are applied from outside (trainer/parallel/), which is why layers live in an
nn.ModuleDict keyed by str(index): names stay stable when a
pipeline stage drops layers and when checkpoints are saved.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.args import ModelArgs
from trainer.model.head_loss import head_loss as fused_head_loss
from trainer.model.permute import combine, dispatch, sort_slots
from trainer.model.rope import mla_qkv, precompute_rope
from trainer.model.swiglu import swiglu
from trainer.model.topk import top_k


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 whatever the activations' dtype, as DeepSeek's reference does
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def softmax_scale(args: ModelArgs) -> float:
    """Attention's softmax scale: 1 / sqrt(qk_head_dim), times mscale'^2 with YaRN, where
    mscale' = 0.1 * mscale * ln(rope_factor) + 1 (DeepSeek-V3's reference model)."""
    scale = args.qk_head_dim**-0.5
    if args.yarn:
        m = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
        scale = scale * m * m
    return scale


class MLA(nn.Module):
    """Multi-head latent attention.

    Keys and values come from one low-rank latent (kv_lora_rank) per token; queries
    optionally too (q_lora_rank). RoPE is decoupled: a qk_rope_head_dim slice of each
    query head is rotated, and one rotated key of that size is shared by all heads.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, args.dim, bias=False)
        self.softmax_scale = softmax_scale(args)  # every attention path reads this one

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, self.n_heads, self.qk_head_dim)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(kv)).view(
            bsz, seqlen, self.n_heads, self.qk_nope_head_dim + self.v_head_dim
        )
        # the rope parts rotated, the one rope key shared by all heads (trainer/model/rope.py)
        q, k, v = mla_qkv(q, kv, k_pe, freqs_cis)

        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=self.softmax_scale,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Also one expert of the MoE."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Top-k router with optional group-limited routing and aux-loss-free balancing.

    ``expert_bias`` is added to the scores only to choose experts; the weights that
    scale expert outputs come from the unbiased scores. The training loop moves the
    bias after each optimizer step (see MoE.update_bias), so no auxiliary loss is needed.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.topk_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.use_bias = args.bias_update_speed > 0
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.register_buffer("expert_bias", torch.zeros(args.n_routed_experts))

    def forward(self, x: torch.Tensor, return_scores: bool = False):
        """x: (tokens, dim) -> (weights, indices), each (tokens, topk); with
        ``return_scores`` also the unbiased scores of every expert (tokens, experts)."""
        scores = F.linear(x.float(), self.weight.float())
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        else:
            scores = scores.sigmoid()
        original_scores = scores
        if self.use_bias:
            scores = scores + self.expert_bias
        if self.n_groups > 1:
            scores = scores.view(x.size(0), self.n_groups, -1)
            if self.use_bias:
                group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
            else:
                group_scores = scores.amax(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            scores = scores.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        indices = top_k(scores, self.topk)  # a Triton kernel on the GPU (trainer.model.topk)
        weights = original_scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if return_scores:
            return weights * self.route_scale, indices, original_scores
        return weights * self.route_scale, indices


class AddBalanceLoss(torch.autograd.Function):
    """Identity on ``y``; in backward, ``loss`` receives the gradient ``scale``. The
    balance loss is thus minimised with the loss that ``y`` feeds, without being added to
    it: it works the same where the loss is computed elsewhere (pipeline stages, another
    rank). ``scale`` is the share of the step's objective that one forward carries (1 /
    micro-batches), the same as the language-model loss gets."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_like = (loss.dtype, loss.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.loss_like
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int,
                          batch: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (eq. 17-20) without its weight: for each
    sequence, sum over experts of f_i * P_i, where f_i = N_r / (K_r T) x the tokens routed
    to expert i and P_i the mean over the sequence's T tokens of the expert's score
    normalised over all experts; averaged over the sequences. ``scores`` (tokens,
    experts) unbiased; ``indices`` (tokens, topk) the chosen experts; tokens in sequence
    order, ``batch`` sequences. Only P_i carries a gradient (to the router)."""
    topk = indices.size(1)
    probs = scores / scores.sum(dim=-1, keepdim=True)
    probs = probs.view(batch, -1, n_experts)  # (batch, T, experts)
    seq_len = probs.size(1)
    slots = indices.view(batch, -1)
    routed = torch.zeros(batch, n_experts, device=scores.device, dtype=probs.dtype)
    routed.scatter_add_(1, slots, torch.ones_like(slots, dtype=probs.dtype))
    f = routed * (n_experts / (topk * seq_len))  # (batch, experts)
    p = probs.mean(dim=1)
    return (f * p).sum(dim=1).mean()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes in on x's device, where it is on; else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU weights stacked in 3-D tensors (expert first), so that
    one grouped GEMM runs all experts on GPU, and expert parallelism can later shard the
    expert dimension from outside. On CPU (or without torch._grouped_mm) the experts run
    one after another."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    # whether ``route`` may fuse the token moves with the experts' own kernels (expert
    # parallelism, whose all-to-alls run between the moves and the experts, turns it off)
    fuse_moves = True

    def route(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
              rank: torch.Tensor, counts: torch.Tensor, topk: int) -> torch.Tensor:
        """The MoE's routed path for tokens ``x`` (T, D) in the compute dtype: each token's
        row dispatched to its ``topk`` experts (slots grouped by expert through ``order``
        and its inverse ``rank``, ``counts`` per expert), the experts, and their rows
        combined back per token, weighted by the gate's ``weights`` (T, topk)."""
        return combine(self(dispatch(x, topk, order, rank), counts), weights, order, rank)

    def grouped(self, x: torch.Tensor) -> bool:
        """Whether the experts run ``x`` through grouped GEMMs (a GPU with
        torch._grouped_mm) rather than one after another."""
        return x.is_cuda and hasattr(torch, "_grouped_mm")

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: tokens sorted by expert; counts: tokens per expert (sums to len(x))."""
        if self.grouped(x):
            return self._grouped(x, counts)
        outs = []
        for e, chunk in enumerate(x.split(counts.tolist())):
            h = F.silu(F.linear(chunk, self.w1[e])) * F.linear(chunk, self.w3[e])
            outs.append(F.linear(h, self.w2[e]))
        return torch.cat(outs)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        x = x.to(dtype)
        # w1 and w3 in one grouped GEMM twice as wide: the weights are cast to the compute
        # dtype (a copy) anyway, so stacking them costs nothing more, and the wider GEMM
        # runs faster than the two narrow ones (docs/benchmarks.md). Each is cast before
        # the stacking, so that in backward each weight's gradient is cast back into a
        # tensor of its own: the cast of the stacked gradient would hand each weight a
        # strided slice, which autograd copies again before it can keep it as .grad.
        w13 = torch.cat([self.w1.to(dtype), self.w3.to(dtype)], dim=1).transpose(-2, -1)
        h13 = torch._grouped_mm(x, w13, offs=offsets)
        w2 = self.w2.to(dtype).transpose(-2, -1)
        return torch._grouped_mm(swiglu(h13), w2, offs=offsets)


class MoE(nn.Module):
    """DeepSeekMoE: shared experts see every token, each token also visits top-k of many
    fine-grained routed experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_routed_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.bias_update_speed = args.bias_update_speed
        self.balance_loss_weight = args.balance_loss_weight
        # the share of the step's objective one forward carries; the training step sets it
        self.balance_grad_scale = 1.0
        self.gate = Gate(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim)
            if args.n_shared_experts > 0 else None
        )
        # tokens routed to each expert by the latest forward pass (not saved, not synced)
        self.tokens_per_expert = torch.zeros(args.n_routed_experts, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        balance = self.balance_loss_weight > 0 and torch.is_grad_enabled()
        if balance:
            weights, indices, scores = self.gate(x, return_scores=True)
        else:
            weights, indices = self.gate(x)
        by_expert, order, rank = sort_slots(indices)
        # tokens per expert from the sorted slots' boundaries: fixed-size and free of
        # atomics (bincount would size its output from the data, so the host would wait
        # for the GPU, and the compiled graph would split, in every MoE layer)
        experts = torch.arange(self.n_routed_experts + 1, device=indices.device)
        counts = torch.searchsorted(by_expert, experts).diff()
        self.tokens_per_expert = counts.detach()
        # Both moves are kernels of their own on the GPU (trainer.model.permute; the FP8
        # experts fuse their activations' casts into them). The experts compute in
        # autocast's dtype, and the repeated rows are moved in it: in the model the
        # residual stream already is (embed_tokens); an MoE called on fp32 tokens under
        # autocast casts them here, once, rather than after the repeat.
        y = self.experts.route(x.to(compute_dtype(x)), weights, order, rank, counts, self.topk)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        y = y.to(x.dtype).view(shape)
        if balance:
            loss = self.balance_loss_weight * sequence_balance_loss(
                scores, indices, self.n_routed_experts, shape[0] if len(shape) == 3 else 1)
            y = AddBalanceLoss.apply(y, loss, self.balance_grad_scale)
        return y

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Move each expert's selection bias toward balance: overloaded experts down,
        underloaded up, by bias_update_speed (DeepSeek-V3, aux-loss-free balancing).
        ``tokens_per_expert`` is the load summed over the micro-batches (and ranks) of
        one optimizer step."""
        if self.bias_update_speed <= 0:
            return
        load = tokens_per_expert.float().to(self.gate.expert_bias.device)
        self.gate.expert_bias.add_(self.bias_update_speed * torch.sign(load.mean() - load))


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), freqs_cis)
        return x + self.ffn(self.ffn_norm(x))


class MTP(nn.Module):
    """Multi-token prediction, depth 1 (DeepSeek-V3 section 2.2).

    Combines the main model's final hidden state at position i with the embedding of
    token i+1, runs one more block, and predicts token i+2 through the shared head.
    ``eh_proj`` reads [enorm(embedding), hnorm(hidden state)], in this order: the layout of
    the released DeepSeek-V3 MTP weights (the paper's equation writes the two the other
    way round; see docs/trainer.md).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(args.n_layers, args)  # index past the last layer: an MoE block
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: torch.Tensor, next_emb: torch.Tensor,
                freqs_cis: torch.Tensor) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, freqs_cis))


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (batch, seq, vocab), computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (h: tokens x dim, targets:
    tokens), computed ``chunk`` tokens at a time: the logits of one chunk exist at a time
    (fp32, chunk x vocab), never those of the whole micro-batch. The gradients of ``h``
    and ``weight`` are computed in the forward pass, chunk by chunk, and only scaled by the
    incoming gradient in backward, so nothing is recomputed. Matmuls run in the dtype of
    ``h`` and ``weight`` (the caller casts them as autocast would); the loss, the softmax
    and the weight's gradient are accumulated in fp32."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        for start in range(0, n, chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, tc.unsqueeze(1)).squeeze(1)
            loss = loss + (lse - picked).sum()
            if need_h or need_w:
                # d(mean loss)/d(logits) = (softmax - one_hot) / n
                g = torch.exp(logits - lse.unsqueeze(1))
                g.scatter_add_(1, tc.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
                g = (g / n).to(h.dtype)
                if need_h:
                    grad_h[start:start + chunk] = g @ weight
                if need_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype),
                None, None)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # what to back-propagate: lm_loss + mtp_loss_weight * mtp_loss
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor  # 0 without MTP


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # training.loss_chunk_tokens: 0 computes the head's logits for the whole
        # micro-batch at once; N computes the loss N tokens at a time (ChunkedHeadLoss).
        self.loss_chunk_tokens = 0
        self.mtp = MTP(args) if args.mtp_depth > 0 else None
        self.register_buffer(
            "freqs_cis",
            precompute_rope(args), persistent=False,
        )
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; output projections of residual branches scaled
        down by sqrt(2 * n_layers) so the residual stream does not grow with depth."""
        std = self.args.init_std
        depth_std = std / math.sqrt(2 * self.args.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, std=depth_std if last in ("wo", "w2") else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Gate):
                nn.init.normal_(module.weight, std=std)
                module.expert_bias.zero_()
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w1, std=std)
                nn.init.normal_(module.w3, std=std)
                nn.init.normal_(module.w2, std=depth_std)
        self.freqs_cis = precompute_rope(self.args).to(self.embed.weight.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings, in the autocast dtype when autocast is on, so that the
        residual stream is bf16 like the activations around it (norms and RoPE still
        compute in fp32)."""
        h = self.embed(tokens)
        return h.to(compute_dtype(h))

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """Mean cross-entropy (fp32) of the output head's logits for the normed hidden
        states ``h`` against ``targets``; ``shift`` drops the last positions of the logits
        and the first of the targets. Its own method so that training.compile can compile
        it with the norm before it.

        A plain linear head (not a tensor-parallel DTensor, whose input is sharded over the
        sequence) drops the shifted positions before its matmul, and its loss is one op,
        ``dsk::head_loss`` (trainer/model/head_loss.py), or with
        ``training.loss_chunk_tokens`` computed chunk by chunk (ChunkedHeadLoss)."""
        weight = self.output.weight
        plain = type(weight) in (torch.Tensor, nn.Parameter)
        if shift and plain:
            h, targets = h[:, :-shift], targets[:, shift:]
        if plain:
            dtype = compute_dtype(h)  # the GEMMs' dtype, as autocast would pick it
            args = (h.reshape(-1, h.shape[-1]).to(dtype), weight.to(dtype),
                    targets.reshape(-1))
            with torch.autocast(h.device.type, enabled=False):
                if self.loss_chunk_tokens:
                    return ChunkedHeadLoss.apply(*args, self.loss_chunk_tokens)
                return fused_head_loss(*args)
        logits = self.output(h)
        if shift and not plain:
            logits, targets = logits[:, :-shift], targets[:, shift:]
        return lm_cross_entropy(logits, targets)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens (batch, seq) -> logits (batch, seq, vocab) when targets is None, else a
        LossOutput (mean cross-entropy over all target tokens)."""
        seqlen = tokens.size(1)
        freqs_cis = self.freqs_cis[:seqlen]
        h = self.embed_tokens(tokens)
        for layer in self.layers.values():
            h = layer(h, freqs_cis)
        if targets is None:
            return self.output(self.norm(h))
        lm_loss = self.head_loss(self.norm(h), targets)
        if self.mtp is None:
            return LossOutput(lm_loss, lm_loss, torch.zeros((), device=lm_loss.device))
        # position i: main hidden state + embedding of token i+1 -> predict token i+2.
        # The MTP block runs over the whole sequence (the last position has no token i+2
        # and is dropped from the loss; causal attention keeps the others unchanged), so
        # its input keeps the main model's length and layout.
        mtp_h = self.mtp(h, self.embed_tokens(targets), freqs_cis)
        mtp_loss = self.head_loss(mtp_h, targets, shift=1)
        return LossOutput(lm_loss + self.args.mtp_loss_weight * mtp_loss, lm_loss, mtp_loss)

    def moe_layers(self) -> list[MoE]:
        """The MoE modules of the main model (not MTP), in layer order."""
        return [b.ffn for b in self.layers.values() if isinstance(b.ffn, MoE)]

    def num_params(self, active_only: bool = False, include_mtp: bool = True) -> int:
        """Parameter count; active_only counts only top-k routed experts per MoE layer."""
        total = 0
        for name, p in self.named_parameters():
            if not include_mtp and name.startswith("mtp."):
                continue
            total += p.numel()
        if active_only:
            n_moe = len(self.moe_layers()) + (1 if include_mtp and self.mtp is not None else 0)
            idle = self.args.n_routed_experts - self.args.n_activated_experts
            total -= n_moe * idle * 3 * self.args.dim * self.args.moe_inter_dim
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active non-embedding parameters (forward and
        backward matmuls; with MTP, the shared output head counts twice, as it runs twice)
        + the attention score and value products, 6 * heads * (qk_head_dim + v_head_dim) *
        seq_len per block, the MTP block included (no discount for the causal mask, as in
        torchtitan and the PaLM paper)."""
        return flops_per_token(self.args, seq_len, self.num_params(active_only=True))


def count_params(args: ModelArgs, active_only: bool = False, include_mtp: bool = True) -> int:
    """Analytic parameter count (no allocation); equals Transformer(args).num_params()."""
    d = args.dim
    if args.q_lora_rank == 0:
        q = d * args.n_heads * args.qk_head_dim
    else:
        q = d * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * (
            args.n_heads * args.qk_head_dim)
    attn = (q + d * (args.kv_lora_rank + args.qk_rope_head_dim) + args.kv_lora_rank
            + args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim)
            + args.n_heads * args.v_head_dim * d)
    dense_ffn = 3 * d * args.inter_dim
    expert = 3 * d * args.moe_inter_dim
    experts = args.n_activated_experts if active_only else args.n_routed_experts
    moe_ffn = (args.n_routed_experts * d + experts * expert
               + args.n_shared_experts * expert)
    block_norms = 2 * d
    n_moe = args.n_layers - args.n_dense_layers
    total = (2 * args.vocab_size * d + d
             + args.n_layers * (attn + block_norms)
             + args.n_dense_layers * dense_ffn + n_moe * moe_ffn)
    if include_mtp and args.mtp_depth > 0:
        total += 2 * d + 2 * d * d + attn + block_norms + moe_ffn + d
    return total


def flops_per_token(args: ModelArgs, seq_len: int, active_params: int) -> float:
    embedding = args.vocab_size * args.dim
    attention_layers = args.n_layers + args.mtp_depth  # the MTP module runs a full block
    attention = (6 * attention_layers * args.n_heads * (args.qk_head_dim + args.v_head_dim)
                 * seq_len)
    # MTP applies the shared output head a second time; its weights count once in
    # active_params, its matmuls twice
    shared_head = args.mtp_depth * args.vocab_size * args.dim
    return 6.0 * (active_params - embedding + shared_head) + attention
