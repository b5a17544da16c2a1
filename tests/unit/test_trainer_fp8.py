"""training.fp8: the config option, its errors (each naming the field), and which modules
torchao converts (on CPU, in torchao's emulation of the float8 arithmetic)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, dump_toml, tiny_doc

from trainer.config import InputError, parse_config

ROOT = Path(__file__).resolve().parents[2]


def with_fp8(value, **parallel) -> dict:
    return tiny_doc(training={"fp8": value}, parallel=parallel)


def test_fp8_is_off_by_default_and_takes_the_recipes():
    assert parse_config(copy.deepcopy(TINY)).training.fp8 == "off"
    for recipe in ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp"):
        assert parse_config(with_fp8(recipe)).training.fp8 == recipe


@pytest.mark.parametrize(("value", "parallel", "words"), [
    ("fp9", {}, "tensorwise"),
    (True, {}, "tensorwise"),
    ("rowwise", {"tp": 2, "dp_shard": 1}, "tp > 1"),
])
def test_fp8_errors_name_the_field(value, parallel, words):
    with pytest.raises(InputError) as err:
        parse_config(with_fp8(value, **parallel), "cfg.toml")
    assert err.value.field == "training.fp8"
    assert words in err.value.message, err.value.message


def test_fp8_on_cpu_stops_the_run_naming_the_field(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dump_toml(with_fp8("tensorwise")))
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg),
                           "--out", str(tmp_path / "run"), "--steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "training.fp8" in proc.stderr and "this run is on cpu" in proc.stderr, proc.stderr


def test_missing_torchao_is_a_config_error(monkeypatch):
    from trainer.parallel import float8

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(InputError) as err:
        float8.linear_config("tensorwise", fsdp=False)
    assert err.value.field == "training.fp8"
    assert float8.TORCHAO_PIN in err.value.message


def _model(**overrides):
    from trainer.model import ModelArgs, Transformer

    fields = dict(vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2,
                  n_heads=4, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_seq_len=32,
                  mtp_depth=1)
    args = ModelArgs(**{**fields, **overrides})
    torch.manual_seed(0)
    return Transformer(args)


def test_block_linears_are_converted_not_the_router_head_or_unaligned():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from trainer.model import Gate, GroupedExperts
    from trainer.parallel.float8 import apply_fp8

    model = _model(kv_lora_rank=24)  # wkv_a: 64 -> 24 + 16 = 40, not a multiple of 16
    done = apply_fp8(model, "tensorwise", torch.device("cpu"), emulate=True)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == set(done["linear"])
    expected = set()
    for block in ("layers.0", "layers.1", "mtp.block"):
        expected |= {f"{block}.attn.{w}" for w in ("wq", "wo")}
    expected |= {f"layers.0.ffn.{w}" for w in ("w1", "w2", "w3")}
    for block in ("layers.1", "mtp.block"):
        expected |= {f"{block}.ffn.shared_experts.{w}" for w in ("w1", "w2", "w3")}
    expected.add("mtp.eh_proj")
    assert converted == expected  # wkv_b (24 -> 128) is unaligned too
    assert type(model.output) is torch.nn.Linear
    assert "output" in done["bf16"] and "layers.1.attn.wkv_a" in done["bf16"]
    assert all(type(m) is Gate for m in model.modules() if isinstance(m, Gate))
    assert [type(m) for m in model.modules() if isinstance(m, GroupedExperts)] == \
        [GroupedExperts, GroupedExperts]  # on CPU the experts stay bf16
    assert done["grouped"] == []


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_fp8_trains_like_the_plain_model(recipe):
    pytest.importorskip("torchao.float8")
    from trainer.parallel.float8 import apply_fp8

    plain, fp8 = _model(), _model()
    apply_fp8(fp8, recipe, torch.device("cpu"), emulate=True)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, fp8):
        out = model(tokens, tokens)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
    assert abs(losses[0] - losses[1]) < 0.02 * losses[0], losses
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in fp8.named_parameters():  # same names and shapes: checkpoints carry over
        assert p.grad is not None and p.grad.shape == grads[name].shape, name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads[name].flatten(),
                                                    dim=0)
        assert cos > 0.95, (name, float(cos))


def test_unknown_recipe_is_refused_before_any_conversion():
    from trainer.parallel.float8 import apply_fp8

    model = _model()
    with pytest.raises(InputError) as err:
        apply_fp8(model, "blockwise", torch.device("cpu"), emulate=True)
    assert err.value.field == "training.fp8"
    assert all(type(m) is torch.nn.Linear for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def test_fp8_skip_leaves_the_named_linears_in_bf16():
    """training.fp8_skip: an entry names a module, or its last dotted parts in every
    layer (and MTP's block)."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from trainer.parallel.float8 import apply_fp8

    model = _model()
    done = apply_fp8(model, "tensorwise", torch.device("cpu"), emulate=True,
                     skip=["attn.wo", "layers.0.ffn.w2"])
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == set(done["linear"])
    kept = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert {"layers.0.attn.wo", "layers.1.attn.wo", "mtp.block.attn.wo",
            "layers.0.ffn.w2"} <= kept
    assert "layers.0.ffn.w1" in converted and "layers.1.attn.wq" in converted
    assert "layers.1.ffn.shared_experts.w2" in converted  # "ffn.w2" was not named


@pytest.mark.parametrize("entry", ["attn.wx", "wo.attn", "output", "o"])
def test_an_fp8_skip_entry_naming_no_converted_linear_is_refused(entry):
    """A typo, a partial word ("o" is not "attn.wo"), or the head, which FP8 never
    converts: refused by name, before any conversion."""
    pytest.importorskip("torchao.float8")
    from trainer.parallel.float8 import apply_fp8

    model = _model()
    with pytest.raises(InputError) as err:
        apply_fp8(model, "tensorwise", torch.device("cpu"), emulate=True,
                  skip=["attn.wq", entry])
    assert err.value.field == "training.fp8_skip"
    assert repr(entry) in str(err.value) and "'attn.wq'" not in str(err.value)
    assert "attn.wkv_b" in str(err.value)  # the names it could have used
    assert all(type(m) is torch.nn.Linear for m in model.modules()
               if isinstance(m, torch.nn.Linear))
