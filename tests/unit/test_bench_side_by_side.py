"""bench/torchtitan_side_by_side.py: what torchtitan is handed comes from our config."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import torchtitan_side_by_side as side  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.model.model import Transformer  # noqa: E402


def test_settings_follow_the_config():
    path = side.config_path("tiny")
    cfg = load_config(path)
    s = side.torchtitan_settings(path, 3)
    m = s["model"]
    assert (m["dim"], m["n_layers"], m["n_heads"]) == (cfg.model.dim, cfg.model.n_layers,
                                                       cfg.model.n_heads)
    assert m["kv_lora_rank"] == cfg.model.kv_lora_rank
    assert m["max_seq_len"] == m["original_seq_len"] == cfg.training.seq_len  # YaRN off
    assert s["moe"]["num_experts"] == cfg.model.n_routed_experts
    assert s["moe"]["top_k"] == cfg.model.n_activated_experts
    assert s["job"]["training.local_batch_size"] == 3
    assert s["job"]["optimizer"]["lr"] == cfg.training.lr


def test_flops_are_those_of_our_model_without_mtp():
    path = side.config_path("tiny")
    cfg = load_config(path)
    model = Transformer(dataclasses.replace(cfg.model, mtp_depth=0))
    assert side.torchtitan_settings(path, 1)["flops_per_token"] == \
        model.flops_per_token(cfg.training.seq_len)
