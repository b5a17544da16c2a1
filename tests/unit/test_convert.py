"""Released weights in and out (trainer/convert.py, train --init-from): a tiny checkpoint
in the Hugging Face DeepSeek layout, written here with the safetensors library (two
shards, an index, two FP8 e4m3 tensors with 128 x 128 block scales), is imported, gives
the logits of the tensors it holds, trains two steps under FSDP 2 and under TP 2 on CPU,
is exported and imported again unchanged; tensors that do not fit the config are named."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch
from helpers import tiny_config

from trainer import convert
from trainer.config import load_config
from trainer.model import Transformer
from trainer.model.names import to_hf

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {
    "model": {"mtp_depth": 1, "q_lora_rank": 16, "inter_dim": 320, "score_func": "sigmoid",
              "route_scale": 2.5, "n_routed_experts": 4, "n_expert_groups": 2,
              "topk_groups": 1, "n_activated_experts": 2},
    "training": {"steps": 2, "micro_batch_size": 2, "warmup_steps": 0, "lr": 1e-3},
    "checkpoint": {"interval": 2, "keep_last": 1},
}
# stored as FP8 with block scales: (320, 64) and (64, 320), partial blocks both ways
FP8 = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"]
E4M3_MAX = 448.0


def hf_names(n_layers: int = 2, n_experts: int = 4) -> set[str]:
    """The Hugging Face DeepSeek-V3 names of the config above, spelled out by hand."""
    def attn(p):
        return {f"{p}.self_attn.{n}.weight" for n in (
            "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
            "kv_b_proj", "o_proj")} | {f"{p}.input_layernorm.weight",
                                       f"{p}.post_attention_layernorm.weight"}

    def moe(p):
        names = {f"{p}.mlp.gate.weight", f"{p}.mlp.gate.e_score_correction_bias"}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}.mlp.shared_experts.{proj}.weight")
            names |= {f"{p}.mlp.experts.{e}.{proj}.weight" for e in range(n_experts)}
        return names

    dense = {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    mtp = f"model.layers.{n_layers}"
    return (
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        | attn("model.layers.0") | dense | attn("model.layers.1") | moe("model.layers.1")
        | attn(mtp) | moe(mtp)
        | {f"{mtp}.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "shared_head.norm",
                                          "embed_tokens", "shared_head.head")}
    )


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with one float32 scale per 128 x 128 block, as DeepSeek-V3 is released."""
    rows, cols = weight.shape
    blocks = (math.ceil(rows / 128), math.ceil(cols / 128))
    scale = torch.empty(blocks)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(blocks[0]):
        for j in range(blocks[1]):
            tile = weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale[i, j] = tile.abs().max() / E4M3_MAX
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (tile / scale[i, j]).to(q.dtype)
    return q, scale


def write_release(tmp: Path, cfg_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Hugging Face checkpoint of random weights, in two shards; returns its directory
    and the tensors it holds in our names (the FP8 ones as their dequantised values)."""
    args = load_config(cfg_path).model
    torch.manual_seed(1)
    model = Transformer(args)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.rand_like(t) + 0.5
        elif name.endswith("expert_bias"):
            state[name] = torch.randn_like(t) * 0.1
        else:
            state[name] = t * 5
    hf = {n: t.clone() for n, t in to_hf(state, args).items()}
    assert set(hf) == hf_names()
    for name in FP8:
        q, scale = quantize(hf[name])
        hf[name], hf[name + "_scale_inv"] = q, scale
        ours = {FP8[0]: "layers.0.ffn.w1", FP8[1]: "layers.0.ffn.w2"}[name] + ".weight"
        state[ours] = convert.dequantize(q, scale)
        assert not torch.equal(state[ours], model.state_dict()[ours] * 5)  # it was rounded
    src = tmp / "release"
    src.mkdir()
    names = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        safetensors_torch.save_file({n: hf[n] for n in part}, str(src / file))
        weight_map.update({n: file for n in part})
    (src / convert.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src, state


def logits_of(state: dict[str, torch.Tensor], args, tokens: torch.Tensor) -> torch.Tensor:
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(tokens)


def first_step_loss(cfg, state, dp_degree: int) -> float:
    """The mean language-model loss of step 1's batch for ``state``, as a run with
    ``dp_degree`` data-parallel ranks sees it."""
    from trainer.data import Loader, build_source

    model = Transformer(cfg.model)
    model.load_state_dict(state)
    t = cfg.training
    losses = []
    for rank in range(dp_degree):
        loader = Loader(build_source(cfg, cfg.path), t.micro_batch_size, t.grad_accum_steps,
                        rank, dp_degree, torch.device("cpu"))
        with torch.no_grad():
            for inputs, targets in loader.next_step():
                losses.append(model(inputs, targets).lm_loss.item())
    return sum(losses) / len(losses)


def main(spec: str) -> int:
    """Run the training jobs of ``spec`` one after another in this process group (one
    torchrun for both layouts: the processes start once)."""
    import contextlib
    import gc
    import io

    import torch.distributed as dist

    from trainer.train import init_distributed, train

    init_distributed()
    try:
        for job in json.loads(Path(spec).read_text()):
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                train(load_config(job["config"]), Path(job["out"]), torch.device("cpu"),
                      init_from=job["init_from"])
            if dist.get_rank() == 0:
                (Path(job["out"]) / "stdout.txt").write_text(captured.getvalue())
            gc.collect()
            dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
    return 0


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    cfg_path = tiny_config(tmp, "ft", **SECTIONS)
    src, state = write_release(tmp, cfg_path)
    ckpt = tmp / "imported"
    assert convert.main(["import", "--from", str(src), "--to", str(ckpt),
                         "--config", str(cfg_path)]) == 0
    return {"tmp": tmp, "cfg_path": cfg_path, "cfg": load_config(cfg_path), "src": src,
            "state": state, "ckpt": ckpt}


def test_import_holds_the_released_tensors_and_their_logits(release):
    args = release["cfg"].model
    imported = convert.read_checkpoint(release["ckpt"], args)
    assert sorted(imported) == sorted(release["state"])
    for name, tensor in release["state"].items():
        assert torch.equal(imported[name], tensor), name
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    assert torch.equal(logits_of(imported, args, tokens),
                       logits_of(release["state"], args, tokens))
    info = json.loads((release["ckpt"] / convert.MARKER).read_text())
    assert info["dtype"] == "float32" and info["tensors"] == len(imported)


@pytest.fixture(scope="module")
def trained(release):
    """Two steps from the imported weights under FSDP 2 and under TP 2 (train() with
    init_from, as `python -m trainer.train --init-from` calls it)."""
    tmp, jobs, runs = release["tmp"], [], {}
    for name, parallel in (("fsdp2", {"dp_shard": 2}), ("tp2", {"tp": 2, "dp_shard": 1})):
        out = tmp / f"run-{name}"
        jobs.append({"config": str(tiny_config(tmp, name, **{**SECTIONS, "parallel": parallel})),
                     "out": str(out), "init_from": str(release["ckpt"])})
        runs[name] = {"out": out, "step": out / "checkpoints" / "step-000002"}
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, str(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    for run in runs.values():
        run["stdout"] = (run["out"] / "stdout.txt").read_text()
        lines = (run["out"] / "metrics.jsonl").read_text().splitlines()
        run["metrics"] = [json.loads(x) for x in lines]
    return runs


@pytest.mark.parametrize("name,dp", [("fsdp2", 2), ("tp2", 1)])
def test_fine_tuning_starts_from_the_imported_weights(release, trained, name, dp):
    run = trained[name]
    assert f"initialised from {release['ckpt']}" in run["stdout"]
    assert [m["step"] for m in run["metrics"]] == [1, 2]
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert summary["start_step"] == 0
    expected = first_step_loss(release["cfg"], release["state"], dp)
    assert abs(run["metrics"][0]["loss"] - expected) < 1e-4, (run["metrics"][0], expected)
    assert run["step"].is_dir()


@pytest.mark.parametrize("name", ["fsdp2", "tp2"])
def test_export_and_import_again_give_the_same_tensors(release, trained, name):
    args, tmp = release["cfg"].model, release["tmp"]
    step = trained[name]["step"]
    trained_state = convert.read_checkpoint(step, args)
    assert not torch.equal(trained_state["layers.1.ffn.gate.weight"],
                           release["state"]["layers.1.ffn.gate.weight"])  # it trained
    for dtype in ("float32", "bfloat16"):
        hf_dir, again = tmp / f"export-{name}-{dtype}", tmp / f"again-{name}-{dtype}"
        assert convert.main(["export", "--from", str(step), "--to", str(hf_dir),
                             "--config", str(release["cfg_path"]), "--dtype", dtype]) == 0
        index = json.loads((hf_dir / convert.INDEX).read_text())
        assert set(index["weight_map"]) == hf_names()
        assert convert.main(["import", "--from", str(hf_dir), "--to", str(again),
                             "--config", str(release["cfg_path"])]) == 0
        reimported = convert.read_checkpoint(again, args)
        for key, tensor in trained_state.items():
            if dtype == "bfloat16" and not key.endswith("expert_bias"):
                tensor = tensor.to(torch.bfloat16).float()
            assert torch.equal(reimported[key], tensor), (dtype, key)


def test_export_writes_bf16_shards(release):
    hf_dir = release["tmp"] / "export-bf16-small-shards"
    assert convert.main(["export", "--from", str(release["ckpt"]), "--to", str(hf_dir),
                         "--config", str(release["cfg_path"]), "--shard-gib", "0.0002"]) == 0
    index = json.loads((hf_dir / convert.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((hf_dir / f).is_file() for f in files)
    tensors = {}
    for f in files:
        tensors.update(safetensors_torch.load_file(str(hf_dir / f)))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(tensors["model.layers.2.embed_tokens.weight"],
                       tensors["model.embed_tokens.weight"])


def test_bf16_import_loads_into_float32_models(release, tmp_path):
    ckpt = tmp_path / "bf16"
    assert convert.main(["import", "--from", str(release["src"]), "--to", str(ckpt),
                         "--config", str(release["cfg_path"]), "--dtype", "bfloat16"]) == 0
    imported = convert.read_checkpoint(ckpt, release["cfg"].model)
    for name, tensor in release["state"].items():
        assert imported[name].dtype == torch.float32
        assert torch.equal(imported[name], tensor.to(torch.bfloat16).float()), name


def _broken_copy(release, tmp: Path, edit) -> Path:
    """The release with ``edit`` applied to its tensors, in one file."""
    tensors = {}
    for f in sorted(release["src"].glob("*.safetensors")):
        tensors.update(safetensors_torch.load_file(str(f)))
    edit(tensors)
    out = tmp / "broken"
    out.mkdir()
    safetensors_torch.save_file(tensors, str(out / convert.SINGLE))
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"model.layers.1.self_attn.kv_b_proj.weight": torch.zeros(64, 32)}),
     "model.layers.1.self_attn.kv_b_proj.weight: shape [64, 32], the config needs [128, 32]"),
    (lambda t: t.update({"model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(32, 64)}),
     "model.layers.1.mlp.experts.4.up_proj.weight: expert 4, but the config has "
     "model.n_routed_experts = 4"),
    (lambda t: t.update({"model.layers.0.mlp.gate_poj.weight": torch.zeros(2, 2)}),
     "model.layers.0.mlp.gate_poj.weight: the config's model has no such tensor"),
    (lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"),
     "layers.1.attn.wo.weight: the config's model has this tensor, the checkpoint does not "
     "(expected a Hugging Face name such as model.layers.1.self_attn.o_proj.weight)"),
    (lambda t: t.pop("model.layers.0.mlp.down_proj.weight_scale_inv"),
     "model.layers.0.mlp.down_proj.weight: FP8 without its block scale"),
    (lambda t: t.pop("model.layers.1.mlp.experts.2.down_proj.weight"),
     "layers.1.ffn.experts.w2: expert 2 is missing"),
])
def test_tensors_that_do_not_fit_are_named(release, tmp_path, capsys, edit, message):
    src = _broken_copy(release, tmp_path, edit)
    code = convert.main(["import", "--from", str(src), "--to", str(tmp_path / "ckpt"),
                         "--config", str(release["cfg_path"])])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "ckpt").exists()


def test_init_from_needs_a_checkpoint(release, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(release["cfg_path"]),
         "--out", str(tmp_path / "run"), "--init-from", str(release["src"])],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and "--init-from" in proc.stderr and "no .metadata" in proc.stderr


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
