"""TensorBoard metrics: the event files hold the same scalars as metrics.jsonl; a
missing tensorboard package stops the run before its first step (exit 2)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trainer.config import InputError, parse_config

ROOT = Path(__file__).resolve().parents[2]
TINY = tomllib.loads((ROOT / "trainer" / "configs" / "tiny.toml").read_text())
SCALARS = ("loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib",
           "max_expert_load_ratio")


def write_config(tmp_path: Path, tensorboard: bool) -> Path:
    doc = copy.deepcopy(TINY)
    doc["model"]["mtp_depth"] = 1
    doc["metrics"] = {"tensorboard": tensorboard}
    lines = []
    for table, values in doc.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if isinstance(value, bool):
                value = str(value).lower()
            lines.append(f'{key} = "{value}"' if isinstance(value, str) and table != "metrics"
                         else f"{key} = {value}")
        lines.append("")
    path = tmp_path / "tb.toml"
    path.write_text("\n".join(lines))
    return path


def run(code: str, cfg: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, "--config", str(cfg), "--out", str(out),
                           "--steps", "4"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


TRAIN = "import sys; from trainer.train import main; sys.exit(main(sys.argv[1:]))"


def test_config_key_defaults_to_off_and_is_typed():
    raw = copy.deepcopy(TINY)
    assert parse_config(raw).metrics.tensorboard is False
    raw["metrics"] = {"tensorboard": "yes"}
    with pytest.raises(InputError, match="metrics.tensorboard"):
        parse_config(raw, "x.toml")


def test_event_files_match_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run(TRAIN, write_config(tmp_path, True), out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in SCALARS:
        expected = [(m["step"], m[key]) for m in metrics if m[key] is not None]
        if key == "mfu":  # null on CPU: no scalar at all
            assert not expected and key not in tags
            continue
        assert expected, key
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        for (_, value), (_, want) in zip(got, expected, strict=True):
            assert value == pytest.approx(want, rel=1e-6), key  # stored as float32


def test_off_by_default_writes_no_event_files(tmp_path):
    out = tmp_path / "run"
    proc = run(TRAIN, write_config(tmp_path, False), out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


def test_missing_package_fails_at_start_naming_the_field(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, True)
    blocked = "import sys; sys.modules['torch.utils.tensorboard'] = None; " + TRAIN
    proc = run(blocked, cfg, out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "metrics.tensorboard" in errors[0] and "pip install" in errors[0]
    assert str(cfg) in errors[0]
    assert not (out / "metrics.jsonl").exists()  # stopped before the first step
    assert "training failed" not in proc.stderr


def test_a_resumed_writer_logs_every_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.metrics import MetricsWriter

    def log(writer, steps, loss):
        for step in steps:
            writer.write({"step": step, "loss": loss + step, "mfu": None})
        writer.close()

    log(MetricsWriter(tmp_path, tensorboard=True), [1, 2, 3, 4], 10.0)  # saved at 2, died at 4
    log(MetricsWriter(tmp_path, tensorboard=True, resumed_from=2), [3, 4, 5], 20.0)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in metrics] == [(1, 11), (2, 12), (3, 23), (4, 24),
                                                          (5, 25)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 11), (2, 12), (3, 23),
                                                                    (4, 24), (5, 25)]
