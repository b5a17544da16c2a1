"""Training config validation: every bad input names its file and field."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, dump_toml

from trainer.config import InputError, check_fsdp_dtype, check_world_size, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "trainer" / "configs"


def tiny_with(section: str, key: str, value) -> dict:
    doc = copy.deepcopy(TINY)
    doc.setdefault(section, {})[key] = value
    return doc


@pytest.mark.parametrize("name", ["tiny", "small", "wide", "16b", "671b"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg.model.n_layers >= 2 and cfg.path.endswith(f"{name}.toml")


@pytest.mark.parametrize(
    ("section", "key", "value", "field", "words"),
    [
        ("model", "dimm", 64, "model.dimm", "unknown key"),
        ("model", "dim", "64", "model.dim", "expected integer"),
        ("training", "lr", -1.0, "training.lr", ""),
        ("model", "score_func", "relu", "model.score_func", "softmax"),
        ("model", "n_heads", 5, "model.n_heads", "must divide model.dim"),
        ("model", "n_activated_experts", 5, "model.n_activated_experts", "exceeds"),
        ("model", "n_expert_groups", 3, "model.n_expert_groups", "must divide"),
        ("model", "n_dense_layers", 3, "model.n_dense_layers", "exceeds n_layers"),
        ("model", "qk_rope_head_dim", 7, "model.qk_rope_head_dim", "even"),
        ("training", "seq_len", 65, "training.seq_len", "max_seq_len"),
        ("training", "warmup_steps", 41, "training.warmup_steps", "exceeds steps"),
        ("data", "kind", "shards", "data.path", "index.json"),
        ("parallel", "tp", 3, "parallel.tp", "must divide model.n_heads"),
        ("parallel", "ep", 3, "parallel.ep", "must divide model.n_routed_experts"),
        ("parallel", "pp", 3, "parallel.pp", "exceeds model.n_layers"),
        ("parallel", "pp_schedule", "zb", "parallel.pp_schedule", "gpipe"),
        ("training", "compile", "yes", "training.compile", "expected boolean"),
        ("training", "fp8_skip", "attn.wo", "training.fp8_skip", "expected array"),
        ("training", "fp8_skip", ["attn..wo"], "training.fp8_skip.0", "does not match"),
        ("training", "fp8_skip", ["attn.wo", "attn.wo"], "training.fp8_skip", "non-unique"),
        ("parallel", "dp_shard", 0, "parallel.dp_shard", ""),
        ("checkpointing", "interval", 5, "checkpointing", "unknown key"),
    ],
)
def test_bad_field_is_named(section, key, value, field, words):
    with pytest.raises(InputError) as err:
        parse_config(tiny_with(section, key, value), "cfg.toml")
    assert err.value.field == field
    assert err.value.file == "cfg.toml"
    assert str(err.value).startswith(f"cfg.toml: {field}: ")
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("parallel", "dp_shard", 0, "parallel.dp_shard: must not be 0 (-1: all ranks left over)"),
        ("training", "lr", -1.0, "training.lr: must be greater than 0, got -1.0"),
        ("model", "vocab_size", 1, "model.vocab_size: must be at least 2, got 1"),
        ("model", "dimm", 64, "model.dimm: unknown key 'dimm': did you mean 'dim'?"),
        ("training", "warmup_stesp", 3,
         "training.warmup_stesp: unknown key 'warmup_stesp': did you mean 'warmup_steps'?"),
        ("checkpointing", "interval", 5,
         "checkpointing: unknown key 'checkpointing': did you mean 'checkpoint'?"),
        ("model", "score_func", "sigmod", "model.score_func: 'sigmod' is not allowed: "
         "did you mean 'sigmoid'? use one of softmax, sigmoid"),
        ("parallel", "pp_schedule", "zb",
         "parallel.pp_schedule: 'zb' is not allowed: use one of gpipe, 1f1b"),
    ],
)
def test_schema_errors_are_in_plain_words_with_suggestions(section, key, value, message):
    """Not JSON Schema's wording ("0 should not be valid under {'const': 0}")."""
    with pytest.raises(InputError) as err:
        parse_config(tiny_with(section, key, value), "cfg.toml")
    assert str(err.value) == f"cfg.toml: {message}"


def test_unknown_key_without_a_close_match_lists_the_known_ones():
    with pytest.raises(InputError) as err:
        parse_config(tiny_with("metrics", "wandb", True), "cfg.toml")
    assert str(err.value) == ("cfg.toml: metrics.wandb: unknown key 'wandb': "
                              "known keys here: tensorboard")


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"parallel": {"tp": 2}, "training": {"seq_len": 63}}, "parallel.tp",
         "must divide training.seq_len"),
        ({"parallel": {"tp": 2}, "model": {"moe_inter_dim": 33}}, "parallel.tp",
         "shared experts"),
        ({"parallel": {"ep": 2}, "model": {"n_dense_layers": 2}}, "parallel.ep", "MoE layers"),
        ({"parallel": {"tp": 2}, "training": {"compile": True}}, "training.compile",
         "does not combine with tp"),
        ({"parallel": {"pp": 2}, "model": {"mtp_depth": 1}}, "parallel.pp", "MTP"),
        ({"parallel": {"pp": 2, "pp_microbatches": 3}}, "parallel.pp_microbatches",
         "must divide training.micro_batch_size"),
        ({"parallel": {"pp": 2, "pp_microbatches": 1}}, "parallel.pp_microbatches",
         "1F1B needs at least pp (2)"),
    ],
)
def test_parallel_rules_name_the_field(changes, field, words):
    doc = copy.deepcopy(TINY)
    for section, values in changes.items():
        doc.setdefault(section, {}).update(values)
    with pytest.raises(InputError) as err:
        parse_config(doc, "cfg.toml")
    assert err.value.field == field and err.value.file == "cfg.toml"
    assert words in str(err.value)


def test_parallel_layouts_are_accepted():
    for parallel in ({"tp": 2}, {"ep": 2}, {"pp": 2, "pp_schedule": "gpipe"},
                     {"pp": 2, "pp_microbatches": 4}, {"tp": 4, "dp_shard": 2}):
        doc = copy.deepcopy(TINY)
        doc["parallel"].update(parallel)
        cfg = parse_config(doc, "cfg.toml")
        assert cfg.parallel.n_microbatches == parallel.get("pp_microbatches", cfg.parallel.pp)
    cfg = parse_config(tiny_with("training", "compile", True), "cfg.toml")
    assert cfg.training.compile is True


def test_fsdp_knobs_are_read_and_bf16_parameters_need_bf16_training():
    cfg = parse_config(TINY, "cfg.toml")
    assert (cfg.parallel.fsdp_reshard_after_forward, cfg.parallel.fsdp_param_dtype,
            cfg.parallel.fsdp_prefetch) == (True, "float32", 0)
    check_fsdp_dtype(cfg, bf16=False, device_type="cpu")
    cfg = parse_config(tiny_with("parallel", "fsdp_param_dtype", "bfloat16"), "cfg.toml")
    check_fsdp_dtype(cfg, bf16=True, device_type="cuda")
    with pytest.raises(InputError, match="need bf16 training.*fp32 on cpu") as err:
        check_fsdp_dtype(cfg, bf16=False, device_type="cpu")
    assert (err.value.field, err.value.file) == ("parallel.fsdp_param_dtype", "cfg.toml")
    with pytest.raises(InputError, match="'float16' is not allowed") as err:
        parse_config(tiny_with("parallel", "fsdp_param_dtype", "float16"), "cfg.toml")
    assert err.value.field == "parallel.fsdp_param_dtype"
    with pytest.raises(InputError) as err:
        parse_config(tiny_with("parallel", "fsdp_reshard_after_forward", "yes"), "cfg.toml")
    assert err.value.field == "parallel.fsdp_reshard_after_forward"
    with pytest.raises(InputError, match="at least 0") as err:
        parse_config(tiny_with("parallel", "fsdp_prefetch", -1), "cfg.toml")
    assert err.value.field == "parallel.fsdp_prefetch"


def test_world_size_checks_every_degree():
    cfg = parse_config(tiny_with("parallel", "tp", 2), "cfg.toml")
    check_world_size(cfg, 2)  # dp_shard 1
    check_world_size(cfg, 4)  # dp_shard 2
    with pytest.raises(InputError, match="not divisible by dp_replicate\\*tp\\*pp = 2"):
        check_world_size(cfg, 3)
    ep = parse_config(tiny_with("parallel", "ep", 2), "cfg.toml")
    check_world_size(ep, 2)
    check_world_size(ep, 4)
    with pytest.raises(InputError, match="ep \\(2\\) must divide dp_shard \\(1\\)") as err:
        check_world_size(ep, 1)
    assert err.value.field == "parallel.ep"
    doc = copy.deepcopy(TINY)
    doc["parallel"].update({"dp_replicate": 2, "dp_shard": 1, "tp": 2})
    with pytest.raises(InputError, match="plain DDP") as err:
        check_world_size(parse_config(doc, "cfg.toml"), 4)
    assert err.value.field == "parallel.dp_replicate"


def test_missing_required_key_is_named():
    doc = copy.deepcopy(TINY)
    del doc["training"]["lr"]
    with pytest.raises(InputError) as err:
        parse_config(doc, "cfg.toml")
    assert err.value.field == "training.lr"


def test_unreadable_and_broken_files(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\ndim = 1\n")
    with pytest.raises(InputError, match="not valid TOML") as err:
        load_config(broken)
    assert err.value.file == str(broken)


def test_world_size_must_match_the_degrees():
    cfg = parse_config(tiny_with("parallel", "dp_replicate", 2), "cfg.toml")
    check_world_size(cfg, 2)  # dp_shard = -1 fills: 2 x 1
    check_world_size(cfg, 4)  # 2 x 2
    with pytest.raises(InputError, match="not divisible") as err:
        check_world_size(cfg, 3)
    assert err.value.file == "cfg.toml"
    fixed = parse_config(tiny_with("parallel", "dp_shard", 2), "cfg.toml")
    with pytest.raises(InputError, match="world size is 3") as err:
        check_world_size(fixed, 3)
    assert err.value.field == "parallel"


def _run(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_config_module_does_not_import_torch():
    proc = _run("import sys, trainer.config as c\n"
                "c.load_config('trainer/configs/671b.toml')\n"
                "print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_fallback_error_without_dsk_provision():
    proc = _run("import sys\nsys.modules['dsk_provision'] = None\n"
                "from trainer.config import InputError, parse_config\n"
                "assert issubclass(InputError, ValueError)\n"
                "try:\n    parse_config({'model': {}}, 'x.toml')\n"
                "except InputError as e:\n    print(e.file, e.field, e.exit_code)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["x.toml", "training", "2"]


def test_train_exits_2_with_one_line_naming_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(dump_toml(tiny_with("model", "n_heads", 6)))
    proc = _run("", "-m", "trainer.train", "--config", str(bad), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{bad}: model.n_heads:" in lines[0]
    assert not (tmp_path / "r").exists()


def test_train_exits_2_when_degrees_do_not_fit_the_world(tmp_path):
    cfg = tmp_path / "dp2.toml"
    cfg.write_text(dump_toml(tiny_with("parallel", "dp_shard", 2)))
    proc = _run("", "-m", "trainer.train", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {cfg}: parallel: dp_replicate*dp_shard*tp*pp = "
                                   "1*2*1*1 = 2, but the world size is 1")


def test_schema_and_model_args_name_the_same_fields():
    import dataclasses
    import json

    from trainer.config import SCHEMA_PATH
    from trainer.model.args import ModelArgs

    schema = json.loads(SCHEMA_PATH.read_text())["properties"]["model"]
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(ModelArgs)}
    assert set(schema["required"]) <= set(schema["properties"])
    # the dataclass holds the defaults; the schema only types and bounds
    assert not [k for k, v in schema["properties"].items() if "default" in v]


def test_model_args_import_no_torch():
    proc = _run("import sys, trainer.model.args as a\n"
                "a.ModelArgs(inter_dim=96)\n"
                "print('torch' in sys.modules, a.ModelArgs(inter_dim=96).moe_inter_dim)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "96"]


def test_left_out_sizes_follow_other_fields():
    doc = copy.deepcopy(TINY)
    del doc["model"]["moe_inter_dim"], doc["model"]["max_seq_len"]
    doc["training"]["seq_len"] = 8192
    cfg = parse_config(doc, "cfg.toml")
    assert cfg.model.moe_inter_dim == cfg.model.inter_dim
    assert cfg.model.max_seq_len == 8192
