"""ModelArgs: the model's dimensions, read by the config loader and by the model.

Free of torch, so that the control node validates configs without it. The defaults are
written here once: a tiny debug model (what tests build directly, and what tiny.toml
spells out); the named configs set every dimension they need. The JSON Schema
(trainer/schemas/train_config.schema.json) holds the same field names with their types
and bounds, and no defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelArgs:
    vocab_size: int = 256
    dim: int = 64
    inter_dim: int = 128  # dense SwiGLU hidden size
    moe_inter_dim: int = 0  # one expert's hidden size; 0: the same as inter_dim
    n_layers: int = 2
    n_dense_layers: int = 1  # the first layers use the dense MLP
    n_heads: int = 4
    # DeepSeekMoE
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k
    n_expert_groups: int = 1
    topk_groups: int = 1
    score_func: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    route_scale: float = 1.0
    bias_update_speed: float = 0.001  # aux-loss-free balancing; 0 turns it off
    balance_loss_weight: float = 0.0  # sequence-wise balance loss (V3: 0.0001); 0: off
    # MLA
    q_lora_rank: int = 0  # 0: queries are projected directly
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # a config that leaves it out gets max(this, training.seq_len)
    # YaRN RoPE scaling, on when max_seq_len > original_seq_len (as DeepSeek's reference
    # model does); rope_factor 1 leaves RoPE and the softmax scale as they are
    original_seq_len: int = 4096
    rope_factor: float = 1.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # multi-token prediction
    mtp_depth: int = 0  # 0 or 1
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        if not self.moe_inter_dim:
            self.moe_inter_dim = self.inter_dim

    @property
    def yarn(self) -> bool:
        """Whether YaRN scales RoPE and the softmax scale."""
        return self.max_seq_len > self.original_seq_len and self.rope_factor != 1.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim
