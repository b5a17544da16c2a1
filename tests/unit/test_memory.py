"""The memory estimate per GPU (trainer/memory.py): its parameter count, its calibration
against the peaks measured on one H200, how the layout moves it, and `train` refusing a
layout that cannot fit before any connection."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dsk_provision import joblaunch
from dsk_provision.errors import InputError
from dsk_provision.inventory import Inventory, Node
from dsk_provision.validation.profiles import profile_names, read_profile
from trainer import memory
from trainer.config import load_config
from trainer.model.model import count_params

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"

# Peaks measured on one H200 (torch.cuda.max_memory_allocated) with the code from a4224e3
# (the MTP head's logits no longer copied) up to the head's loss op (dsk::head_loss), bf16
# autocast, compile on, no activation checkpointing (docs/benchmarks.md): config,
# micro-batch, accumulation, MTP, training.loss_chunk_tokens, GiB. The estimate's two
# constants are fitted to them; they are compared with the estimate of that code
# (Layout.head_loss_op False).
MEASURED = [
    ("small", 16, 1, True, 0, 77.7),
    ("small", 20, 1, True, 0, 93.6),
    ("small", 16, 1, False, 0, 67.0),
    ("small", 16, 1, True, 8192, 71.7),
    ("small", 20, 1, True, 8192, 85.8),
    ("small", 24, 1, True, 8192, 100.8),
    ("small", 28, 1, True, 8192, 115.9),
    ("wide", 4, 1, True, 0, 76.7),  # wide.toml has no MTP
    ("wide", 8, 1, True, 0, 97.1),
    ("wide", 12, 1, True, 0, 117.5),
    ("wide", 14, 1, True, 0, 127.8),
]


def config(name: str, **training):
    cfg = load_config(CONFIGS / f"{name}.toml")
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


@pytest.mark.parametrize("name", ["tiny", "small", "wide", "16b", "671b"])
def test_the_estimate_counts_every_parameter_once(name):
    cfg = config(name, moments_dtype="float32")
    m = cfg.model
    blocks = [memory.block_params(m, i >= m.n_dense_layers) for i in range(m.n_layers)]
    if m.mtp_depth:
        blocks.append(memory.mtp_params(m))
    total = sum(a + b for a, b in blocks) + 2 * m.vocab_size * m.dim + m.dim
    assert total == count_params(m)
    # one GPU: 4 bytes per parameter for the parameters, 8 for the optimizer state
    est = memory.estimate(cfg, 1)
    assert est.items["parameters (fp32)"] == 4 * total
    assert est.items["optimizer state (AdamW, fp32)"] == 8 * total
    # bf16 moments (training.moments_dtype): 4 bytes, everything else as before
    narrow = memory.estimate(config(name, moments_dtype="bfloat16"), 1)
    assert narrow.total == est.total - 4 * total
    assert narrow.items.pop("optimizer state (AdamW, bf16)") == 4 * total
    assert narrow.items == {k: v for k, v in est.items.items()
                            if k != "optimizer state (AdamW, fp32)"}


@pytest.mark.parametrize(("name", "micro_batch", "accumulation", "mtp", "chunk", "measured"),
                         MEASURED)
def test_the_estimate_is_within_two_percent_of_the_measured_peaks(name, micro_batch,
                                                                  accumulation, mtp, chunk,
                                                                  measured):
    cfg = config(name, micro_batch_size=micro_batch, grad_accum_steps=accumulation,
                 loss_chunk_tokens=chunk, moments_dtype="float32")  # as they were measured
    if not mtp:
        cfg.model.mtp_depth = 0
    est = memory.estimate(cfg, layout=replace(memory.layout_of(cfg, 1), head_loss_op=False))
    assert abs(est.total_gib - measured) / measured < 0.02, est.table()


# Peaks measured on one H100 with the head's loss op (2026-12-06, docs/benchmarks.md), not
# fitted to: small.toml at micro-batch 12 with fp32 and bf16 AdamW moments, GiB.
MEASURED_WITH_LOSS_OP = [("float32", 58.77), ("bfloat16", 54.84)]


@pytest.mark.parametrize(("moments", "measured"), MEASURED_WITH_LOSS_OP)
def test_the_loss_op_drops_the_logits_gradient_as_measured(moments, measured):
    """The op keeps the logits' gradient where the logits were, so backward allocates no
    second tokens x vocab tensor: about 2.9 GiB less at small.toml's micro-batch 12."""
    cfg = config("small", micro_batch_size=12, moments_dtype=moments)
    lay = memory.layout_of(cfg, 1)
    est = memory.estimate(cfg, layout=lay)
    before = memory.estimate(cfg, layout=replace(lay, head_loss_op=False))
    assert abs(est.total_gib - measured) / measured < 0.01, est.table()
    assert 2.5 < before.total_gib - est.total_gib < 3.0
    # a chunked, tensor-parallel or pipelined head keeps the loss without the op
    chunked = memory.estimate(cfg, layout=replace(lay, loss_chunk=8192))
    assert chunked.items == memory.estimate(
        cfg, layout=replace(lay, loss_chunk=8192, head_loss_op=False)).items


def test_the_layout_moves_the_estimate():
    cfg = config("16b", activation_checkpoint="none")
    one = memory.estimate(cfg, 8)
    # FSDP over 8 holds a quarter of the parameters that FSDP over 2 does
    two = memory.estimate(cfg, 2)
    assert two.items["parameters (fp32)"] == pytest.approx(4 * one.items["parameters (fp32)"])
    acts = {}
    for mode in memory.CHECKPOINT_MODES:
        cfg.training.activation_checkpoint = mode
        acts[mode] = memory.estimate(cfg, 8).items["activations"]
    assert acts["none"] > acts["selective"] > 4 * acts["full"] > 0
    # tp halves the activations (sequence parallelism) and all but the routed experts
    cfg.training.activation_checkpoint = "none"
    cfg.parallel.tp = 2
    tp2 = memory.estimate(cfg, 8)
    dp4 = memory.estimate(config("16b", activation_checkpoint="none"), 4)
    assert tp2.items["activations"] == pytest.approx(dp4.items["activations"] / 2)
    assert tp2.items["parameters (fp32)"] < dp4.items["parameters (fp32)"]


def test_the_fsdp_options_move_the_estimate():
    cfg = config("16b", activation_checkpoint="none")
    fp32 = memory.estimate(cfg, 8).items
    cfg.parallel.fsdp_param_dtype = "bfloat16"
    bf16 = memory.estimate(cfg, 8).items
    # bf16 gathers: 2 bytes per gathered parameter against 4, the unsharded gradients
    # in bf16 and fp32, and no autocast copies; the sharded state is unchanged
    assert bf16["FSDP gathered blocks (bf16)"] == pytest.approx(
        fp32["FSDP gathered blocks (fp32)"] * (2 * 2 + 6) / (3 * 4))
    assert fp32["bf16 weight copies (autocast)"] > 0 == bf16["bf16 weight copies (autocast)"]
    assert bf16["parameters (fp32)"] == fp32["parameters (fp32)"]
    cfg.parallel.fsdp_prefetch = 3  # three blocks gathered ahead, not one
    ahead = memory.estimate(cfg, 8).items
    assert ahead["FSDP gathered blocks (bf16)"] == pytest.approx(
        bf16["FSDP gathered blocks (bf16)"] * (4 * 2 + 6) / (2 * 2 + 6))
    cfg.parallel.fsdp_reshard_after_forward = False
    kept = memory.estimate(cfg, 8).items
    # every block stays gathered until its backward: 2 bytes x 26 MoE blocks (and the
    # dense one) + 6 bytes x one block's gradients, against 2 x 2 + 6
    assert kept["FSDP gathered blocks (bf16)"] > 5.5 * bf16["FSDP gathered blocks (bf16)"]
    # ... and without FSDP neither knob changes anything
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 8, 1
    ddp = memory.estimate(cfg, 8).items
    cfg.parallel.fsdp_param_dtype, cfg.parallel.fsdp_reshard_after_forward = "float32", True
    cfg.parallel.fsdp_prefetch = 0
    assert memory.estimate(cfg, 8).items == ddp


def test_with_ep_the_prefetch_counts_each_blocks_experts_as_a_group():
    """With ep > 1 each MoE block's routed experts are an FSDP group of their own, right
    after their block (trainer.parallel.apply.fsdp_order): prefetching N groups ahead
    holds a block and its experts for N = 1, not two whole blocks."""
    cfg = config("16b", activation_checkpoint="none")
    m = cfg.model
    cfg.parallel.ep = 2
    assert memory.layout_of(cfg, 8).dp_shard == 8
    # gathered per GPU: the block without its routed experts (attention, router, shared
    # experts) whole, and its routed experts over ep
    dense, experts = memory.block_params(m, moe=True)
    routed = experts / 2
    items = memory.estimate(cfg, 8).items
    # the default (FSDP2's own one group ahead): a MoE block and its experts
    assert items["FSDP gathered blocks (fp32)"] == pytest.approx(
        4 * (dense + routed) + 4 * routed)
    cfg.parallel.fsdp_prefetch = 3  # block, experts, block, experts
    assert memory.estimate(cfg, 8).items["FSDP gathered blocks (fp32)"] == pytest.approx(
        4 * 2 * (dense + routed) + 4 * routed)
    # without ep the experts are in their block's group: N whole blocks ahead
    cfg.parallel.ep = 1
    whole = dense + experts
    assert memory.estimate(cfg, 8).items["FSDP gathered blocks (fp32)"] == pytest.approx(
        4 * 4 * whole + 4 * whole)


def test_fsdp_keeps_the_roots_parameters_gathered():
    """FSDP2 never reshards its root after forward: each stage's embedding, final norm and
    head stay whole (tp shards them), in the gathered dtype; without FSDP there are none."""
    cfg = config("16b", activation_checkpoint="full")
    m = cfg.model
    items = memory.estimate(cfg, 8).items
    assert items["FSDP gathered root (fp32)"] == 4 * (2 * m.vocab_size * m.dim + m.dim)
    cfg.parallel.fsdp_param_dtype = "bfloat16"
    assert memory.estimate(cfg, 8).items["FSDP gathered root (bf16)"] == \
        2 * (2 * m.vocab_size * m.dim + m.dim)
    cfg.parallel.fsdp_param_dtype = "float32"
    cfg.parallel.tp, cfg.parallel.pp, cfg.model.mtp_depth = 2, 2, 0
    lay = memory.layout_of(cfg, 8)
    assert (lay.dp_shard, lay.tp, lay.pp) == (2, 2, 2)
    first = memory._stage_estimate(m, lay, 0)["FSDP gathered root (fp32)"]
    last = memory._stage_estimate(m, lay, 1)["FSDP gathered root (fp32)"]
    assert (first, last) == (4 * m.vocab_size * m.dim / 2, 4 * (m.vocab_size * m.dim + m.dim) / 2)
    cfg.parallel.tp, cfg.parallel.pp = 1, 1
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 8, 1
    assert not [k for k in memory.estimate(cfg, 8).items if k.startswith("FSDP")]


def test_a_pipeline_stage_keeps_the_micro_batches_in_flight():
    cfg = config("16b", micro_batch_size=4, activation_checkpoint="full")
    cfg.parallel.pp = 4
    cfg.model.mtp_depth = 0
    cfg.parallel.pp_schedule = "gpipe"
    gpipe = memory.estimate(cfg, 8)
    cfg.parallel.pp_schedule = "1f1b"
    one_f_one_b = memory.estimate(cfg, 8)
    assert gpipe.items["activations"] >= one_f_one_b.items["activations"]
    assert gpipe.layout.dp_shard == 2


def test_a_layout_that_cannot_fit_is_refused_with_the_nearest_that_fits():
    cfg = config("small", micro_batch_size=64)
    with pytest.raises(InputError) as err:
        memory.check_fits(cfg, 1, 140)
    text = str(err.value)
    assert "the layout needs about" in text and "more than the GPUs' 140 GiB" in text
    assert "activations" in text and "optimizer state" in text
    assert "nearest layout that fits:" in err.value.hint
    near = memory.nearest_fit(cfg, memory.layout_of(cfg, 1), 140)
    assert near is not None and near.total_gib <= 140
    assert near.layout.micro_batch * near.layout.grad_accum == 64  # the same global batch
    assert near.layout.gpus == 1  # no more GPUs needed when a smaller change fits
    # what fits is not refused
    assert memory.check_fits(config("small"), 1, 140).total_gib < 140


def test_the_command_prints_a_table_and_exits_2_when_it_cannot_fit(capsys):
    small = str(CONFIGS / "small.toml")
    assert memory.main(["--config", small]) == 0
    out = capsys.readouterr().out
    for item in ("parameters (fp32)", "optimizer state (AdamW, bf16)", "activations", "total"):
        assert item in out
    assert memory.main(["--config", small, "--gpu-memory", "40"]) == 2
    assert "does not fit 40 GiB; nearest layout that fits:" in capsys.readouterr().out


def test_every_gpu_profile_says_its_gpu_memory():
    for name in profile_names():
        profile = read_profile(name)
        if profile["thresholds"].get("require_cuda"):
            assert profile["gpu_memory_gib"] > 0, name


def no_connection(_inventory, node):
    raise AssertionError(f"a connection to {node.name} was attempted")


def test_train_refuses_a_layout_that_cannot_fit_before_any_connection(tmp_path):
    cfg_file = tmp_path / "big.toml"
    cfg_file.write_text((CONFIGS / "small.toml").read_text().replace(
        "micro_batch_size = 16", "micro_batch_size = 128"))
    base = {"dsk_profile": "h200-sxm-8", "dsk_gpus_per_node": 8}
    nodes = [Node(f"gpu{i}", f"10.0.0.{i}", 22, "root", 8, dict(base)) for i in (1, 2)]
    hosts = tmp_path / "hosts.yml"
    inv = Inventory(path=hosts, nodes=nodes, vars=base, hosts_file=hosts)
    with pytest.raises(InputError) as err:
        joblaunch.train(inv, cfg_file, runs_dir=tmp_path / "runs", transport=no_connection)
    assert err.value.exit_code == 2
    assert "GiB per GPU" in str(err.value) and str(cfg_file) in str(err.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("micro_batch", [16, 28])
def test_the_chunked_loss_needs_less_than_the_whole_one(micro_batch):
    chunked = memory.estimate(config("small", micro_batch_size=micro_batch,
                                     loss_chunk_tokens=8192), 1)
    whole = memory.estimate(config("small", micro_batch_size=micro_batch), 1)
    assert chunked.total < whole.total


def test_a_tensor_parallel_head_keeps_the_whole_loss():
    tp = config("small", loss_chunk_tokens=8192)
    tp.parallel.tp, tp.model.mtp_depth = 2, 0
    tp_whole = config("small")
    tp_whole.parallel.tp, tp_whole.model.mtp_depth = 2, 0
    assert memory.estimate(tp, 2).total == memory.estimate(tp_whole, 2).total


def test_fp8_experts_keep_no_bf16_copy_of_the_routed_experts():
    cfg = config("wide")
    bf16 = memory.estimate(cfg, 1).items
    cfg.training.fp8_experts = "rowwise"
    fp8 = memory.estimate(cfg, 1).items
    m = cfg.model
    per_block = m.n_routed_experts * 3 * m.dim * m.moe_inter_dim
    moe_blocks = m.n_layers - m.n_dense_layers
    # the saved bf16 copies lose every MoE block's routed experts; their e4m3 copies are
    # saved instead (one byte each), and the backward holds one transposed w1|w3 at a time
    assert bf16["bf16 weight copies (autocast)"] - fp8["bf16 weight copies (autocast)"] == \
        2 * per_block * moe_blocks
    assert fp8["FP8 copies of the routed experts"] == \
        pytest.approx(per_block * (moe_blocks + 2 / 3))
    assert "FP8 copies of the routed experts" not in bf16
    assert {k: v for k, v in fp8.items() if "copies" not in k} == \
        {k: v for k, v in bf16.items() if "copies" not in k}
    # with checkpointing only the recomputed block's copies exist: the largest block
    # without its routed experts (wide.toml's dense first layer) against the largest with
    cfg.training.activation_checkpoint = "full"
    ckpt = memory.estimate(cfg, 1).items
    cfg.training.fp8_experts = "off"
    ckpt_bf16 = memory.estimate(cfg, 1).items
    blocks = [memory.block_params(m, i >= m.n_dense_layers) for i in range(m.n_layers)]
    assert max(b[0] for b in blocks) == blocks[0][0]  # the dense layer
    assert ckpt_bf16["bf16 weight copies (autocast)"] - \
        ckpt["bf16 weight copies (autocast)"] == \
        2 * (max(sum(b) for b in blocks) - blocks[0][0])
    assert ckpt["FP8 copies of the routed experts"] == pytest.approx(per_block * 5 / 3)
