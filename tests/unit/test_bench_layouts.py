"""bench/gpu_layouts.py: every layout it can run writes a config the trainer accepts,
with the layout's own settings in it (the GPU run itself needs two GPUs)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_layouts  # noqa: E402

from trainer.config import check_world_size, load_config  # noqa: E402


@pytest.mark.parametrize("name", sorted(gpu_layouts.LAYOUTS))
def test_each_layout_writes_a_valid_config(tmp_path, name):
    base = tomllib.loads((ROOT / "trainer" / "configs" / "small.toml").read_text())
    gpus, overrides = gpu_layouts.LAYOUTS[name]
    path = tmp_path / f"{name}.toml"
    gpu_layouts.write_config(base, overrides, path)
    cfg = load_config(path)
    check_world_size(cfg, gpus)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value, dotted
    assert cfg.model.mtp_depth == 0
