"""Every parallel layout trains like one process: DDP, FSDP (also keeping blocks gathered
after forward, prefetching two blocks, and gathering in bf16 against bf16 autocast),
tensor (+ sequence) parallel, expert parallel, pipeline parallel (GPipe, 1F1B) on 2 CPU
processes, seven 2 x 2 combinations on 4, a checkpoint saved under FSDP resumed under TP
and in one process, and torch.compile'd blocks in one process.

To keep the processes few, one torchrun runs several layouts one after another: this
file is also the script it runs (``python -m torch.distributed.run ... THIS JOBS.json``).
Each layout sees the same global batch of 8 sequences per step as the reference, which
runs in one process with micro_batch_size 4 and grad_accum_steps 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
# the layouts reduce in other orders than one process; measured differences are below
# 1e-5 for tp, ep and pp and below 1e-4 for FSDP; the tolerance leaves room for other
# CPUs' math libraries
TOLERANCE = 2e-3
BF16_TOLERANCE = 5e-3


# name -> (processes, config sections); all with a global batch of 8 sequences; ep2 and
# pp2_tp2 also recompute activations in backward
ACC2 = {"training": {"grad_accum_steps": 2}}
QLORA = {"model": {"q_lora_rank": 16, "mtp_depth": 1}}  # compressed queries and MTP
LAYOUTS = {
    "single": (1, ACC2),
    "single_qlora": (1, {**ACC2, **QLORA}),
    "single_compile": (1, {"training": {"grad_accum_steps": 2, "compile": True}}),
    # the head's loss over chunks of 100 tokens (a micro-batch has 256): with MTP's
    # shifted loss, and under FSDP
    "single_qlora_chunked": (1, {"training": {"grad_accum_steps": 2, "loss_chunk_tokens": 100},
                                 **QLORA}),
    "fsdp2_chunked": (2, {"parallel": {"dp_shard": -1},
                          "training": {"loss_chunk_tokens": 100}}),
    "ddp2": (2, {"parallel": {"dp_replicate": 2, "dp_shard": 1}}),
    "fsdp2_kept": (2, {"parallel": {"dp_shard": -1, "fsdp_reshard_after_forward": False}}),
    # each block gathers the next two ahead, also while recomputing in backward
    "fsdp2_prefetch2": (2, {"parallel": {"dp_shard": -1, "fsdp_prefetch": 2},
                            "training": {"activation_checkpoint": "full"}}),
    # bf16 autocast in one process against FSDP gathering its parameters in bf16
    "single_bf16": (1, {"training": {"grad_accum_steps": 2, "dtype": "bfloat16"}}),
    "fsdp2_bf16": (2, {"parallel": {"dp_shard": -1, "fsdp_param_dtype": "bfloat16"},
                       "training": {"dtype": "bfloat16"}}),
    "fsdp2": (2, {"parallel": {"dp_shard": -1},
                  "checkpoint": {"interval": 3, "keep_last": 2}}),
    "tp2": (2, {**ACC2, "parallel": {"tp": 2}}),
    "tp2_qlora": (2, {"training": {"grad_accum_steps": 2}, "parallel": {"tp": 2}, **QLORA}),
    "ep2": (2, {"parallel": {"ep": 2}, "checkpoint": {"interval": 3, "keep_last": 2},
                "training": {"activation_checkpoint": "full"}}),
    "pp2_gpipe": (2, {**ACC2, "parallel": {"pp": 2, "pp_schedule": "gpipe"}}),
    "pp2_1f1b": (2, {**ACC2, "parallel": {"pp": 2, "pp_schedule": "1f1b"},
                     "checkpoint": {"interval": 3, "keep_last": 2}}),
    "fsdp2_tp2": (4, {"parallel": {"dp_shard": 2, "tp": 2}}),
    "fsdp2_tp2_bf16": (4, {"parallel": {"dp_shard": 2, "tp": 2, "fsdp_param_dtype": "bfloat16"},
                           "training": {"dtype": "bfloat16"}}),
    "pp2_fsdp2": (4, {"parallel": {"dp_shard": 2, "pp": 2, "pp_schedule": "1f1b"}}),
    # the routed experts are FSDP groups of their own, prefetched with the blocks
    "fsdp4_ep2": (4, {"training": {"micro_batch_size": 2},
                      "parallel": {"ep": 2, "fsdp_prefetch": 2}}),
    "pp2_tp2": (4, {"training": {"grad_accum_steps": 2, "activation_checkpoint": "full"},
                    "parallel": {"pp": 2, "tp": 2}}),
    "pp2_ep2": (4, {"parallel": {"pp": 2, "ep": 2, "pp_schedule": "gpipe"}}),
    "tp2_ep2": (4, {"parallel": {"tp": 2, "ep": 2}}),
    "hsdp2x2_ep2": (4, {"training": {"micro_batch_size": 2},
                        "parallel": {"dp_replicate": 2, "dp_shard": 2, "ep": 2}}),
    # resumed after step 3 from another layout's checkpoint
    "resume_tp2": (2, {**ACC2, "parallel": {"tp": 2}}),
    "resume_single": (1, ACC2),
    "resume_pp2_from_ep2": (2, {**ACC2, "parallel": {"pp": 2}}),
    "resume_single_from_pp2": (1, ACC2),
}
RESUMED = {"resume_tp2": "fsdp2", "resume_single": "fsdp2", "resume_pp2_from_ep2": "ep2",
           "resume_single_from_pp2": "pp2_1f1b"}


def run_jobs(nproc: int, jobs: list[dict], tmp: Path) -> None:
    spec = tmp / f"jobs-{nproc}.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [__file__, str(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[int, float]]:
    """Train every layout; a resume runs after the layout whose checkpoint it loads (the
    jobs of one torchrun run in order: 2 processes, then 1, then 4)."""
    tmp = tmp_path_factory.mktemp("layouts")
    jobs: dict[int, list[dict]] = {1: [], 2: [], 4: []}
    for name, (nproc, sections) in LAYOUTS.items():
        job = {"config": str(tiny_config(tmp, name, **sections)), "out": str(tmp / name)}
        if name in RESUMED:
            job["resume_from"] = str(tmp / RESUMED[name] / "checkpoints" / "step-000003")
        jobs[nproc].append(job)
    for nproc in (2, 1, 4):
        run_jobs(nproc, jobs[nproc], tmp)
    result = {}
    for name in LAYOUTS:
        lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
        metrics = list(map(json.loads, lines))
        result[name] = {m["step"]: m["loss"] for m in metrics}
        result[name]["mtp"] = {m["step"]: m["mtp_loss"] for m in metrics}
        header = (tmp / name / "stdout.txt").read_text().splitlines()[0]
        result[name]["header"] = header
    return result


def assert_matches(layout: dict, reference: dict, steps, tolerance: float = TOLERANCE) -> None:
    for step in steps:
        assert abs(layout[step] - reference[step]) < tolerance, (step, layout, reference)


@pytest.mark.parametrize("name", ["ddp2", "fsdp2", "fsdp2_kept", "fsdp2_prefetch2", "tp2",
                                  "ep2", "pp2_gpipe", "pp2_1f1b", "fsdp2_tp2", "pp2_fsdp2",
                                  "fsdp4_ep2", "pp2_tp2", "pp2_ep2", "tp2_ep2", "hsdp2x2_ep2",
                                  "fsdp2_chunked"])
def test_layout_matches_one_process(runs, name):
    reference = runs["single"]
    assert sorted(k for k in runs[name] if isinstance(k, int)) == list(range(1, STEPS + 1))
    assert_matches(runs[name], reference, range(1, STEPS + 1))
    assert runs[name][STEPS] < runs[name][1] - 1.0  # it learns


def test_layouts_are_what_the_header_says(runs):
    assert "(1x1 dp, tp 2)" in runs["tp2"]["header"]
    assert "(1x2 dp, ep 2)" in runs["ep2"]["header"]
    assert "(1x1 dp, pp 2 (gpipe x 2))" in runs["pp2_gpipe"]["header"]
    assert "(1x2 dp, pp 2 (1f1b x 2))" in runs["pp2_fsdp2"]["header"]
    assert "(1x2 dp, tp 2)" in runs["fsdp2_tp2"]["header"]
    assert "(1x4 dp, ep 2)" in runs["fsdp4_ep2"]["header"]
    assert "(1x1 dp, tp 2, pp 2 (1f1b x 2))" in runs["pp2_tp2"]["header"]
    assert "(1x2 dp, ep 2, pp 2 (gpipe x 2))" in runs["pp2_ep2"]["header"]
    assert "(1x2 dp, tp 2, ep 2)" in runs["tp2_ep2"]["header"]
    assert "(2x2 dp, ep 2)" in runs["hsdp2x2_ep2"]["header"]


def test_tensor_parallel_with_compressed_queries_and_mtp(runs):
    assert_matches(runs["tp2_qlora"], runs["single_qlora"], range(1, STEPS + 1))
    assert runs["single_qlora"]["mtp"][1] > 0
    assert_matches(runs["tp2_qlora"]["mtp"], runs["single_qlora"]["mtp"], range(1, STEPS + 1))


def test_the_chunked_head_loss_trains_like_the_whole_one(runs):
    # same process count and reduction order: only the loss's summation differs
    for key in ("loss", "mtp"):
        got = runs["single_qlora_chunked"] if key == "loss" else runs["single_qlora_chunked"]["mtp"]
        ref = runs["single_qlora"] if key == "loss" else runs["single_qlora"]["mtp"]
        for step in range(1, STEPS + 1):
            assert abs(got[step] - ref[step]) < 1e-4, (key, step, got, ref)
    assert runs["single_qlora_chunked"]["mtp"][1] > 0


def test_fsdp_bf16_parameters_train_like_bf16_autocast_in_one_process(runs):
    # bf16 matmuls in both (measured: within 1e-3 of each other over the six steps);
    # the dtypes inside are checked in test_parallel_units.py
    for name in ("fsdp2_bf16", "fsdp2_tp2_bf16"):
        assert_matches(runs[name], runs["single_bf16"], range(1, STEPS + 1), BF16_TOLERANCE)
    # ... and not the fp32 run's numbers, which FSDP in fp32 repeats to 1e-6
    assert max(abs(runs["fsdp2_bf16"][s] - runs["fsdp2"][s]) for s in range(1, STEPS + 1)) > 1e-4
    assert runs["fsdp2_bf16"][STEPS] < runs["fsdp2_bf16"][1] - 1.0


def test_compiled_blocks_train_like_eager_ones(runs):
    assert_matches(runs["single_compile"], runs["single"], range(1, STEPS + 1))


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_checkpoint_resumes_in_another_layout(runs, name):
    assert sorted(k for k in runs[name] if isinstance(k, int)) == [4, 5, 6]
    assert_matches(runs[name], runs[RESUMED[name]], [4, 5, 6])


def main(spec: str) -> int:
    """Run the jobs of ``spec`` one after another in this process group."""
    import contextlib
    import gc
    import io

    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.train import init_distributed, train

    device = init_distributed()
    rank = dist.get_rank()
    try:
        for job in json.loads(Path(spec).read_text()):
            out = Path(job["out"])
            cfg = load_config(job["config"])
            cfg.training.steps = STEPS
            if rank == 0 and "resume_from" in job:
                src = Path(job["resume_from"])
                shutil.copytree(src, out / "checkpoints" / src.name)
            dist.barrier()
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                train(cfg, out, device)
            if rank == 0:
                (out / "stdout.txt").write_text(captured.getvalue())
            # free the job's DDP/FSDP state and its communication threads now, as
            # trainer.train.main does before it destroys the process group
            gc.collect()
            dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
