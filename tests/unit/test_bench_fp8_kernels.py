"""bench/fp8_kernels.py's cases from a config (its GPU timings are in docs/benchmarks.md):
one case per distinct width and producer, together covering exactly the linears that
the trainer's FP8 conversion (trainer.parallel.float8.linear_filter) converts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import fp8_kernels as bench  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.parallel.float8 import linear_filter  # noqa: E402


@pytest.mark.parametrize("config", ["wide", "small"])
def test_the_cases_cover_the_converted_linears_once(config):
    cases = bench.config_cases(config, None, ("tensorwise",))
    with torch.device("meta"):
        model = Transformer(load_config(ROOT / "trainer" / "configs" / f"{config}.toml").model)
    converted = sorted(fqn for fqn, m in model.named_modules() if linear_filter(m, fqn))
    covered = sorted(fqn for case in cases for fqn in case.args[3])
    assert covered == converted
    producers = {fqn.rsplit(".", 1)[-1]: case.args[0] for case in cases for fqn in case.args[3]}
    assert producers["wo"] == "none" and producers["w2"] == "swiglu"
    assert producers["wq"] == producers["wkv_a"] == producers["w1"] == "norm"
    widths = {(case.args[1], case.args[2]) for case in cases}
    assert len(widths) == len(cases)  # no width measured twice for the same producer


def test_an_unknown_recipe_is_refused_by_name():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fp8_kernels.py"), "--config",
                           "tiny", "--recipes", "tensorwise,blockwise"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--recipes: unknown blockwise" in proc.stderr
