"""bench/saved_activations.py on tiny.toml, eager, on this machine's CPU: every part and
both kinds of block are measured and counted; with the GPU's kernels stood in for, what
each part saves grows linearly with the tokens, and the MoE feed-forward saves exactly one
SwiGLU product per slot less than with the CPU's kernels (the stand-in SwiGLU keeps only
its input, as the Triton kernel does)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import TINY_CONFIG, run_bench

from trainer import memory
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TOKENS = [16, 32, 64]


def measure(tmp_path: Path, *flags: str) -> dict:
    return run_bench(tmp_path, "saved_activations.py", "--config", TINY_CONFIG, "--tokens",
                     *map(str, TOKENS), *flags, out=f"saved{'-'.join(flags)}.json")[1]


def slopes(part: dict) -> list[float]:
    saved = [part["saved_bytes"][str(t)] for t in TOKENS]
    return [(saved[i + 1] - saved[i]) / (TOKENS[i + 1] - TOKENS[i])
            for i in range(len(TOKENS) - 1)]


def test_the_saved_activations_benchmark_measures_and_counts_each_part(tmp_path):
    m = load_config(ROOT / "trainer" / "configs" / "tiny.toml").model
    gpu = measure(tmp_path)
    cpu = measure(tmp_path, "--cpu-path")
    assert gpu["gpu_path"] is True and cpu["gpu_path"] is False and gpu["compile"] is False
    assert gpu["layers"] == {"dense": 0, "moe": 1}
    assert set(gpu["parts"]) == {"attention", "dense_ffn", "moe_ffn"}
    assert set(gpu["blocks"]) == {"dense", "moe"}
    for row in [*gpu["parts"].values(), *gpu["blocks"].values()]:
        assert row["measured"] > 0 and row["counted"] > 0
    # the counts are trainer.memory's, eager, without activation checkpointing
    assert gpu["parts"]["attention"]["counted"] == memory.attention_activation_bytes(m, "none")
    assert gpu["blocks"]["moe"]["counted"] == (memory.attention_activation_bytes(m, "none")
                                               + memory.ffn_activation_bytes(m, True, "none",
                                                                             False))
    assert gpu["parts"]["dense_ffn"]["counted"] == memory.ffn_activation_bytes(m, False, "none",
                                                                               False)
    # with the stand-ins nothing grows faster than the tokens (the attention keeps no
    # scores of every token pair); the slope is the bytes per token reported
    for name, part in gpu["parts"].items():
        assert slopes(part) == [part["measured"]] * 2, name
    # the CPU's math attention does keep them
    assert slopes(cpu["parts"]["attention"])[1] > slopes(cpu["parts"]["attention"])[0]
    # the dense feed-forward runs the same kernels either way; the routed experts' SwiGLU
    # on the CPU also keeps silu(w1 x), bf16, for each of a token's top-k slots
    assert cpu["parts"]["dense_ffn"]["measured"] == gpu["parts"]["dense_ffn"]["measured"]
    assert (cpu["parts"]["moe_ffn"]["measured"] - gpu["parts"]["moe_ffn"]["measured"]
            == 2 * m.n_activated_experts * m.moe_inter_dim)


def test_the_stand_ins_are_undone_after_the_measurement(tmp_path):
    import torch.nn.functional as F

    from bench import saved_activations
    from trainer.model import model as M

    before = (F.scaled_dot_product_attention, M.swiglu, M.GroupedExperts.forward)
    assert saved_activations.main(["--config", "tiny", "--tokens", "8", "16",
                                   "--out", str(tmp_path / "saved.json")]) == 0
    assert (F.scaled_dot_product_attention, M.swiglu, M.GroupedExperts.forward) == before
    assert json.loads((tmp_path / "saved.json").read_text())["parts"]["moe_ffn"]["measured"] > 0
