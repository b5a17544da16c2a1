"""trainer.probes.allreduce: sizes, nccl-tests bandwidth formulas, and a real 2-rank gloo run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fake_nccl_last

from trainer.probes import allreduce

REPO = Path(__file__).resolve().parents[2]


def test_parse_size():
    assert allreduce.parse_size("512") == 512
    assert allreduce.parse_size("1K") == 1024
    assert allreduce.parse_size("16M") == 16 << 20
    assert allreduce.parse_size("2g") == 2 << 30
    with pytest.raises(ValueError):
        allreduce.parse_size("1T")


def test_sizes_inclusive_geometric():
    assert allreduce.sizes(1024, 16384, 2) == [1024, 2048, 4096, 8192, 16384]
    assert allreduce.sizes(1024, 5000, 4) == [1024, 4096]
    with pytest.raises(ValueError):
        allreduce.sizes(1024, 512, 2)
    with pytest.raises(ValueError):
        allreduce.sizes(1024, 4096, 1)


def test_bandwidth_formulas_match_nccl_tests():
    # 1 GB in 10 ms is 100 GB/s algorithm bandwidth; with 8 ranks busbw = algbw * 2*7/8.
    assert allreduce.algbw_gbs(10**9, 0.01) == pytest.approx(100.0)
    assert allreduce.busbw_factor(8) == pytest.approx(1.75)
    assert allreduce.busbw_gbs(10**9, 0.01, 8) == pytest.approx(175.0)
    assert allreduce.busbw_factor(2) == 1.0
    assert allreduce.busbw_factor(1) == 0.0  # one rank moves nothing over a bus


def test_pattern_sum_is_exact():
    import torch

    world = 5
    bufs = []
    for rank in range(world):
        buf = torch.empty(37, dtype=torch.bfloat16)
        allreduce.fill_pattern(buf, rank)
        bufs.append(buf.to(torch.float64))
    expected = allreduce.expected_sum(37, world, torch.bfloat16, "cpu").to(torch.float64)
    assert torch.equal(sum(bufs), expected)


def test_two_ranks_gloo_on_loopback(tmp_path):
    out = tmp_path / "allreduce.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "trainer.probes.allreduce", "--begin", "1K", "--end", "64K", "--factor", "4",
         "--warmup", "1", "--iters", "3", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "gloo"
    assert result["world_size"] == 2
    assert [r["size"] for r in result["results"]] == [1024, 4096, 16384, 65536]
    assert result["wrong_total"] == 0
    for row in result["results"]:
        assert row["count"] == row["size"] // 4
        for mode in ("out_of_place", "in_place"):
            m = row[mode]
            assert m["time_us"] > 0
            # busbw == algbw * 2(n-1)/n with n = 2
            assert m["busbw_gbs"] == pytest.approx(m["algbw_gbs"])
            assert m["algbw_gbs"] == pytest.approx(row["size"] / (m["time_us"] / 1e6) / 1e9)
    assert "Out of bounds values : 0 OK" in proc.stdout
    assert "out-of-place" in proc.stdout


def test_wrong_elements_are_counted(tmp_path, monkeypatch):
    """A corrupted reduction is caught: every wrong element is counted, in both modes."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        real = dist.all_reduce

        def corrupting(tensor, *args, **kwargs):
            work = real(tensor, *args, **kwargs)
            if tensor.numel() > 1:  # leave the one-element timing and count reductions alone
                tensor[0] += 1
                tensor[-1] += 1
            return work

        monkeypatch.setattr(allreduce.dist, "all_reduce", corrupting)
        # 1025 elements: the last one lies past the whole periods of the pattern.
        row = allreduce.run_size(4100, "float32", 0, 1, torch.device("cpu"))
        assert row["count"] == 1025
        assert row["out_of_place"]["wrong"] == 2
        assert row["in_place"]["wrong"] == 2
        monkeypatch.setattr(allreduce.dist, "all_reduce", real)
        row = allreduce.run_size(4096, "float32", 0, 1, torch.device("cpu"))
        assert row["out_of_place"]["wrong"] == row["in_place"]["wrong"] == 0
    finally:
        dist.destroy_process_group()


def test_the_gloo_run_names_torch_and_why(tmp_path):
    """On CPUs auto takes torch.distributed and says why; --api libnccl refuses to start."""
    out = tmp_path / "allreduce.json"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "1", "-m", "trainer.probes.allreduce", "--begin", "1K", "--end", "1K",
            "--iters", "1", "--json-out", str(out)]
    proc = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["api"] == allreduce.API_TORCH
    assert result["api_note"] == "no CUDA GPU: gloo through torch.distributed"
    assert "api torch.distributed" in proc.stdout
    out.unlink()
    proc = subprocess.run(base + ["--api", "libnccl"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "--api libnccl needs CUDA GPUs" in proc.stderr
    assert not out.exists()


def test_the_probe_through_ncclallreduce(one_rank, fake_nccl):
    """The libnccl path end to end on one rank with the stand-in library: the unique id
    crosses the process group whole, each timed iteration is one ncclAllReduce, out of
    place leaves the send buffer alone (the check counts it) and the results are right."""
    import torch

    comm, api, note = allreduce.open_communicator("libnccl", "nccl", torch.device("cpu"),
                                                  library_path=fake_nccl)
    try:
        assert (api, note) == (allreduce.API_LIBNCCL, None)
        calls = fake_nccl_last(comm.library)[0][7]
        row = allreduce.run_size(4100, "bfloat16", 2, 3, torch.device("cpu"), comm)
        assert row["count"] == 2050
        assert row["out_of_place"]["wrong"] == row["in_place"]["wrong"] == 0
        # Per mode: 2 warm-up + 3 timed + 1 check.
        assert fake_nccl_last(comm.library)[0][7] == calls + 12
        assert fake_nccl_last(comm.library)[0][3] == 9  # ncclBfloat16
    finally:
        comm.close()
    assert fake_nccl_last(comm.library)[1] == 0


def test_auto_falls_back_to_torch_without_the_library(one_rank, tmp_path):
    import torch

    missing = str(tmp_path / "libnccl.so.2")
    comm, api, note = allreduce.open_communicator("auto", "nccl", torch.device("cpu"),
                                                  library_path=missing)
    assert comm is None and api == allreduce.API_TORCH
    assert note.startswith("libnccl not loaded on every rank (no NCCL library could be loaded")
    with pytest.raises(SystemExit, match="--api libnccl: no NCCL library could be loaded"):
        allreduce.open_communicator("libnccl", "nccl", torch.device("cpu"),
                                    library_path=missing)
    assert allreduce.open_communicator("torch", "nccl", torch.device("cpu")) == \
        (None, allreduce.API_TORCH, None)
