"""The bundled model against DeepSeek-V3's own model code: the reference's logits for
five tiny configs (tests/fixtures/deepseek_v3_reference, see its README), reproduced from
the same weights mapped by name (trainer/model/names.py) within 1e-4 in float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.model import Transformer
from trainer.model.args import ModelArgs
from trainer.model.names import from_reference, to_reference

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepseek_v3_reference"
CASES = sorted(json.loads((FIXTURES / "cases.json").read_text()))
TOLERANCE = 1e-4
# the reference's ModelArgs fields named otherwise here
RENAMED = {"n_limited_groups": "topk_groups"}


def model_args(case: dict) -> ModelArgs:
    fields = {RENAMED.get(k, k): v for k, v in case["config"].items()}
    # gates without the expert bias route as the reference's non-V3 path does
    fields["bias_update_speed"] = 0.001 if case["gate_bias"] else 0.0
    return ModelArgs(**fields)


def reference_model(case: dict) -> Transformer:
    args = model_args(case)
    torch.manual_seed(0)
    model = Transformer(args)
    state = from_reference(case["state_dict"], args.n_routed_experts)
    # gates without a bias in the reference have a zero (and unused) expert_bias here
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".gate.expert_bias") for k in missing)
    assert bool(missing) != case["gate_bias"]
    return model.eval()


def test_every_case_is_here():
    assert CASES == ["groups4_top3_shared2", "no_bias_group_max", "sigmoid_groups_bias",
                     "softmax_qlora", "yarn"]


@pytest.mark.parametrize("name", CASES)
def test_logits_match_the_reference(name):
    case = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    model = reference_model(case)
    with torch.no_grad():
        logits = model(case["tokens"])
    assert logits.shape == case["logits"].shape
    diff = (logits - case["logits"]).abs().max().item()
    assert diff < TOLERANCE, f"{name}: max |logit difference| {diff:.2e}"


def test_yarn_is_what_the_yarn_case_needs():
    """Without YaRN the yarn case's logits are far off: the case can fail."""
    case = torch.load(FIXTURES / "yarn.pt", weights_only=True)
    case["config"]["rope_factor"] = 1.0  # YaRN off
    model = reference_model(case)
    with torch.no_grad():
        diff = (model(case["tokens"]) - case["logits"]).abs().max().item()
    assert diff > 100 * TOLERANCE


def test_names_round_trip():
    case = torch.load(FIXTURES / "softmax_qlora.pt", weights_only=True)
    ours = from_reference(case["state_dict"], case["config"]["n_routed_experts"])
    back = to_reference(ours)
    assert sorted(back) == sorted(case["state_dict"])
    assert all(torch.equal(back[k], v) for k, v in case["state_dict"].items())


def test_released_configs_carry_yarn_and_turn_it_on_past_4k():
    import dataclasses
    import math

    from trainer.config import load_config
    from trainer.model.model import precompute_rope, softmax_scale

    root = Path(__file__).resolve().parents[2] / "trainer" / "configs"
    for name, mscale in (("671b", 1.0), ("16b", 0.707)):
        m = load_config(root / f"{name}.toml").model
        assert (m.original_seq_len, m.rope_factor, m.beta_fast, m.beta_slow, m.mscale) == (
            4096, 40.0, 32, 1, mscale)
        assert not m.yarn and softmax_scale(m) == m.qk_head_dim**-0.5  # max_seq_len 4096
        long = dataclasses.replace(m, max_seq_len=16384)
        assert long.yarn
        factor = 0.1 * mscale * math.log(40.0) + 1.0
        assert softmax_scale(long) == pytest.approx(m.qk_head_dim**-0.5 * factor**2)
        # the long-wavelength frequencies are divided by 40, the short ones kept
        short_rope, long_rope = precompute_rope(m), precompute_rope(long)
        assert torch.equal(long_rope[:4096, 0], short_rope[:, 0])
        ratio = short_rope[1, -1, 1] / long_rope[1, -1, 1]
        assert ratio.item() == pytest.approx(40.0, rel=1e-3)


def test_without_yarn_rope_is_plain():
    args = ModelArgs(max_seq_len=64, original_seq_len=64, rope_factor=40.0)
    from trainer.model.model import precompute_rope

    d = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(64, dtype=torch.float32), freqs)
    assert torch.equal(precompute_rope(args), torch.stack([angles.cos(), angles.sin()], -1))
