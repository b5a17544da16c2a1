"""Reports: JSON and Markdown from one dict, written whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import first_node_transport, free_port, loose_paths, umask

from dsk_provision.validation import report
from dsk_provision.validation.flow import ValidationReport
from dsk_provision.validation.results import CheckResult

FACTS = {
    "os": {"distribution": "Debian", "version": "12"}, "kernel": "6.1.0", "cpus": 2,
    "mem_total_mb": 24000, "mem_available_mb": 20000,
    "disk_free_gb": {"/": 40.0, "/opt/dsk": 40.0},
    "gpus": {"declared": 0, "detected": 0, "models": []}, "nvidia_driver": None,
    "python": {"path": "/usr/bin/python3", "version": "3.11.2", "torch": "2.13.0",
               "cuda_available": False},
    "time_synced": True, "skipped": {},
}


def sample(tmp_path, busbw_status="pass"):
    checks = [
        CheckResult("node1", "gpu_count", "pass", 0, 0, "0 GPU(s) as declared (no GPUs)"),
        CheckResult("node1", "disk_free", "pass", {"/": 40.5}, {"/": 1}, "enough free space"),
        CheckResult("node2", "time_synced", "skip", None, True, "unknown"),
        CheckResult("node2", "ssh_peers", "fail", "1/2", "all", "cannot reach by SSH: node3"),
        CheckResult("cluster", "allreduce_busbw", busbw_status, 0.61, 0.05, "busbw 0.61 GB/s"),
    ]
    bench = {"world_size": 2, "backend": "gloo", "api": "torch.distributed",
             "api_note": "no CUDA GPU: gloo through torch.distributed", "nccl": None,
             "torch": "2.13.0", "warmup": 5,
             "iters": 20, "busbw_factor": 1.0, "wrong_total": 0, "avg_busbw_gbs": 0.3,
             "results": [{"size": 1024, "count": 256, "type": "float", "redop": "sum", "root": -1,
                          "out_of_place": {"time_us": 240.5, "algbw_gbs": 0.004,
                                           "busbw_gbs": 0.004, "wrong": 0},
                          "in_place": {"time_us": 230.1, "algbw_gbs": 0.0046,
                                       "busbw_gbs": 0.0046, "wrong": 0}}]}
    return ValidationReport(run_dir=tmp_path, cluster="demo", profile="cpu-sandbox",
                            nodes=["node1", "node2"], thresholds={"allreduce_min_busbw_gbs": 0.05},
                            checks=checks, allreduce=bench, started="2026-11-28T10:00:00",
                            elapsed_s=12.3)


def test_markdown_has_summary_node_tables_and_allreduce(tmp_path):
    text = report.render_markdown(sample(tmp_path).to_dict())
    assert text.startswith("# Validation report: demo")
    assert "**FAILED**: 3 passed, 1 failed, 1 skipped." in text
    assert "- **node2** `ssh_peers`: cannot reach by SSH: node3" in text
    assert "### node1" in text and "### node2" in text and "### cluster" in text
    assert "| disk_free | PASS | /: 40.5 | /: 1 | enough free space |" in text
    assert "| ssh_peers | FAIL | 1/2 | all |" in text
    assert ("2 ranks, backend gloo through torch.distributed (no CUDA GPU: gloo through "
            "torch.distributed), torch 2.13.0") in text
    assert "| size (B) | count | type | out-of-place time | algbw | busbw | #wrong |" in text
    assert "| 1024 | 256 | float | 240.5 | 0.004 | 0.004 | 0 | 230.1 | 0.005 | 0.005 | 0 |" in text


def test_passed_report(tmp_path):
    rep = sample(tmp_path)
    rep.checks = [c for c in rep.checks if c.status != "fail"]
    data = rep.to_dict()
    assert data["passed"] is True
    assert "**PASSED**" in report.render_markdown(data)


def test_write_reports_whole(tmp_path):
    data = sample(tmp_path).to_dict()
    json_path, md_path = report.write_reports(data, tmp_path)
    assert json.loads(json_path.read_text())["summary"] == {"pass": 3, "fail": 1, "skip": 1}
    assert md_path.read_text() == report.render_markdown(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_cells_escape_pipes():
    text = report.render_markdown({"checks": [
        {"node": "n1", "check": "c", "status": "fail", "value": "a|b", "threshold": None,
         "message": "x | y"}], "nodes": ["n1"]})
    assert "a\\|b" in text and "x \\| y" in text


@pytest.mark.slow
def test_validate_on_two_local_nodes_writes_reports_and_names_the_bad_node(tmp_path, monkeypatch):
    """validate() end to end without a sandbox: the playbook is replaced by facts files,
    the benchmark runs for real under torchrun on two local "nodes" over loopback. node2's
    torchrun starts first, so c10d makes it rank 0 against the inventory's order: each
    node's compute result is still its own run directory's (not looked up by rank)."""
    import io
    import sys

    from rich.console import Console

    from dsk_provision import runner
    from dsk_provision.errors import RunFailed
    from dsk_provision.inventory import Inventory, Node
    from dsk_provision.validation.flow import validate

    port = free_port()
    nodes = [Node(f"node{i}", "127.0.0.1", 22, None, 0,
                  {"dsk_root": str(tmp_path / f"node{i}"), "dsk_python": sys.executable,
                   "dsk_rdzv_port": port, "ansible_connection": "local",
                   "dsk_socket_ifname": "lo"}) for i in (1, 2)]
    inv = Inventory(path=tmp_path / "hosts.yml", nodes=nodes, vars={"dsk_cluster_name": "t"},
                    hosts_file=tmp_path / "hosts.yml")

    def fake_playbook(playbook, inventory, *, command, runs_dir, extra_vars, console):
        assert playbook == "validate.yml"
        facts_dir = Path(extra_vars["dsk_run_dir"]) / "facts"
        facts_dir.mkdir(parents=True)
        for node in inventory.nodes:
            facts = dict(FACTS, host=node.name, hostname=node.name,
                         ssh_peers={n.name: True for n in inventory.nodes if n is not node})
            if node.name == "node2":
                facts["gpus"] = {"declared": 0, "detected": 1, "models": ["H100"]}
            (facts_dir / f"{node.name}.json").write_text(json.dumps(facts))

    monkeypatch.setattr(runner, "run_playbook", fake_playbook)
    out = io.StringIO()
    # Tiny sizes reach no meaningful busbw: that check is switched off here.
    with pytest.raises(RunFailed) as err, umask(0o000):
        validate(inv, runs_dir=tmp_path / "runs", begin="1K", end="4K", warmup=1, iters=2,
                 console=Console(file=out, width=120), timeout_s=120,
                 thresholds={"allreduce_min_busbw_gbs": 0},
                 transport=first_node_transport("node2", "-m torch.distributed.run"))
    assert "node2 gpu_count" in str(err.value), str(err.value)
    assert err.value.nodes == ["node2"], str(err.value)
    assert err.value.report.passed is False
    (run_dir,) = (tmp_path / "runs").glob("*-validate")
    data = json.loads((run_dir / "report.json").read_text())
    assert data["passed"] is False
    assert data["allreduce"]["world_size"] == 2
    assert [r["size"] for r in data["allreduce"]["results"]] == [1024, 2048, 4096]
    assert sorted(data["gpu_perf"]) == ["node1", "node2"], data.get("gpu_perf")
    # no GPU here: the trainer's CPU dtype, not bf16, which CPUs without bf16
    # instructions run a hundred times slower
    assert data["gpu_perf"]["node1"]["matmul"]["dtype"] == "float32"
    assert {c["node"] for c in data["checks"] if c["check"] == "matmul_tflops"
            and c["status"] != "fail"} == {"node1", "node2"}
    statuses = {(c["node"], c["check"]): c["status"] for c in data["checks"]}
    assert statuses[("node2", "gpu_count")] == "fail"
    assert statuses[("node1", "gpu_count")] == "pass"
    assert statuses[("cluster", "allreduce_correct")] == "pass"
    assert "- **node2** `gpu_count`: 1 GPU(s) detected, 0 declared" in (
        run_dir / "report.md").read_text()
    assert "gpu_count" in out.getvalue() and "FAIL" in out.getvalue()
    # Reports, probe logs and fetched results are private whatever the umask (the facts
    # here come from the stand-in above; the role's modes are tested in test_files).
    assert loose_paths(run_dir, skip=("facts",)) == []


def test_markdown_shows_compute_side_by_side_isolation_and_plot(tmp_path):
    from dsk_provision.validation import parsers

    rep = sample(tmp_path)
    rep.gpu_perf = {"node1": {"device": "cuda", "matmul": {"size": 8192, "dtype": "bfloat16"},
                              "copy_bytes": 4 << 30, "warmup": 5, "iters": 20,
                              "devices": [{"index": 0, "name": "NVIDIA H200",
                                           "matmul_tflops": 801.5, "copy_gbs": 4301.2}]}}
    nccl = parsers.parse_nccl_tests(
        (Path(__file__).parent / "fixtures/gpu/all_reduce_perf_8gpu.txt").read_text())
    ours = json.loads(json.dumps(nccl))
    ours["results"][-1]["in_place"]["busbw_gbs"] = 380.0
    ours["results"][-1]["out_of_place"]["busbw_gbs"] = 300.0
    ours["api"] = "libnccl"
    rep.intra_node = {"node1": ours}
    rep.nccl_tests = {"node1": nccl}
    rep.isolation = {"pairs": [{"nodes": ["node1", "node2"], "busbw_gbs": 0.001, "slow": True},
                               {"nodes": ["node2", "node3"], "busbw_gbs": None, "slow": True},
                               {"nodes": ["node3", "node1"], "busbw_gbs": 0.5, "slow": False}],
                     "slow_nodes": ["node2"], "slow_links": [], "all_slow": False}
    rep.plots = ["allreduce_busbw.png"]
    text = report.render_markdown(rep.to_dict())
    assert "| node1 | NVIDIA H200 0 | 801.50 | 4301.2 |" in text
    assert "bfloat16 matmul 8192^3" in text
    assert "this tool's benchmark (libnccl) beside nccl-tests' all_reduce_perf" in text
    assert ("| size (B) | node1 ours out | node1 ours in | node1 nccl-tests out "
            "| node1 nccl-tests in | node1 ours/nccl-tests |") in text
    assert "| 1048576 | 40.670 | 40.960 | 40.670 | 40.960 | 100% |" in text
    # The lower of the two modes: out of place 300 / 385.93 against in place 380 / 386.42.
    assert "| 8589934592 | 300.000 | 380.000 | 385.930 | 386.420 | 78% |" in text
    assert "| node2 + node3 | - | slow |" in text
    assert "Culprit: node **node2**." in text
    assert "![busbw](allreduce_busbw.png)" in text


def test_plot_is_a_png_with_one_line_per_test(tmp_path):
    from dsk_provision.validation import plots

    path = plots.plot_busbw({"across nodes": [(1024, 0.1), (2048, 0.2)],
                             "within node1": [(1024, 1.0), (2048, 2.0)], "empty": []},
                            tmp_path / "busbw.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.plot_busbw({"empty": []}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_console_table_groups_skips_by_reason_and_keeps_failures(tmp_path):
    import io

    from rich.console import Console

    from dsk_provision.validation.flow import print_table
    from dsk_provision.validation.results import CheckResult

    nodes = ["node1", "node2", "node3"]
    checks = [CheckResult(n, "disk_free", "pass", 80, 50, "") for n in nodes]
    checks.append(CheckResult("node2", "mem_available", "fail", 10, 1024, "below 1024 MB"))
    for name in ("gpu_model", "driver_version", "nvlink"):
        checks += [CheckResult(n, name, "skip", None, None, "no GPU on this node") for n in nodes]
    checks.append(CheckResult("node3", "time_synced", "skip", None, None, "no timedatectl"))
    report = ValidationReport(run_dir=tmp_path, cluster="demo", profile="cpu-sandbox",
                              nodes=nodes, thresholds={}, checks=checks)
    out = io.StringIO()
    print_table(report, Console(file=out, width=200))
    text = out.getvalue()
    rows = [line for line in text.splitlines() if "│" in line]
    gpu_rows = [r for r in rows if "no GPU on this node" in r]
    assert len(gpu_rows) == 1 and "all 3 nodes" in gpu_rows[0]
    assert "gpu_model, driver_version, nvlink" in gpu_rows[0]
    assert any("node3" in r and "no timedatectl" in r for r in rows)
    assert any("node2" in r and "mem_available" in r and "FAIL" in r for r in rows)
    assert "4 passed" not in text and "3 passed, 1 failed, 10 skipped" in text


@pytest.mark.parametrize("width", [80, 100])
def test_console_table_keeps_check_names_whole_on_a_terminal_of_80_columns(tmp_path, width):
    """What make demo shows: the longest values and reasons fold, no check's name breaks,
    and every line keeps its right border inside the terminal."""
    import io

    from rich.console import Console

    from dsk_provision.validation.flow import print_table
    from dsk_provision.validation.results import CheckResult

    nodes = ["node1", "node2", "node3"]
    checks = []
    for n in nodes:
        checks += [CheckResult(n, "python_env", "pass", "torch 2.13.0+cpu", "torch", ""),
                   CheckResult(n, "disk_free", "pass", {"/": 74.5, "/opt/dsk": 74.5},
                               {"/": 1, "/opt/dsk": 1}, "")]
    checks += [CheckResult("cluster", "allreduce_correct", "pass", 0, 0, ""),
               CheckResult("cluster", "allreduce_busbw", "pass", 1.09, 0.05, "")]
    gpu = ("gpu_model", "driver_version", "persistence_mode", "nccl_settings", "nccl_tests")
    for name in gpu:
        checks += [CheckResult(n, name, "skip", None, None, "no GPU on this node") for n in nodes]
    checks += [CheckResult(n, "infiniband", "skip", None, None,
                           "no RDMA device (/sys/class/infiniband is empty or absent)")
               for n in nodes]
    report = ValidationReport(run_dir=tmp_path, cluster="demo", profile="cpu-sandbox",
                              nodes=nodes, thresholds={}, checks=checks)
    out = io.StringIO()
    print_table(report, Console(file=out, width=width))
    lines = out.getvalue().splitlines()
    rows = [line for line in lines if line.startswith(("│", "┃"))]
    assert rows and all(len(line) <= width and line.rstrip().endswith(("│", "┃")) for line in rows)
    cells = {cell.strip().rstrip(",") for line in rows for cell in line.split("│")}
    cells |= {word.rstrip(",") for line in rows for word in line.split()}
    for name in ("python_env", "disk_free", "allreduce_correct", "allreduce_busbw",
                 "infiniband", *gpu):
        assert name in cells, name


@pytest.mark.slow
def test_validate_leaves_a_cordoned_node_out_of_the_benchmarks(tmp_path, monkeypatch):
    """A cordoned node gets its node checks and a "cordoned" skip, but the all-reduce runs
    on the nodes in service only, and a cluster-wide failure does not name it."""
    import io
    import sys

    from rich.console import Console

    from dsk_provision import runner
    from dsk_provision.errors import RunFailed
    from dsk_provision.inventory import Inventory, Node
    from dsk_provision.validation.flow import validate

    port = free_port()
    nodes = [Node(f"node{i}", "127.0.0.1", 22, None, 0,
                  {"dsk_root": str(tmp_path / f"node{i}"), "dsk_python": sys.executable,
                   "dsk_rdzv_port": port, "ansible_connection": "local",
                   "dsk_socket_ifname": "lo",
                   **({"dsk_cordoned": "fan 2 dead"} if i == 1 else {})}) for i in (1, 2, 3)]
    inv = Inventory(path=tmp_path / "hosts.yml", nodes=nodes, vars={"dsk_cluster_name": "t"},
                    hosts_file=tmp_path / "hosts.yml")

    def fake_playbook(playbook, inventory, *, command, runs_dir, extra_vars, console):
        assert [n.name for n in inventory.nodes] == ["node1", "node2", "node3"]
        facts_dir = Path(extra_vars["dsk_run_dir"]) / "facts"
        facts_dir.mkdir(parents=True)
        for node in inventory.nodes:
            facts = dict(FACTS, host=node.name, hostname=node.name,
                         ssh_peers={n.name: True for n in inventory.nodes if n is not node})
            (facts_dir / f"{node.name}.json").write_text(json.dumps(facts))

    monkeypatch.setattr(runner, "run_playbook", fake_playbook)
    # An impossible busbw makes the cluster-wide check fail: it must name node2 and node3.
    with pytest.raises(RunFailed) as err:
        validate(inv, runs_dir=tmp_path / "runs", begin="1K", end="2K", warmup=1, iters=2,
                 console=Console(file=io.StringIO(), width=120), timeout_s=120,
                 thresholds={"allreduce_min_busbw_gbs": 1e9}, isolate=False)
    assert err.value.nodes == ["node2", "node3"], str(err.value)
    (run_dir,) = (tmp_path / "runs").glob("*-validate")
    data = json.loads((run_dir / "report.json").read_text())
    assert data["allreduce"]["world_size"] == 2
    statuses = {(c["node"], c["check"]): c["status"] for c in data["checks"]}
    assert statuses[("node1", "cordoned")] == "skip"
    assert statuses[("node1", "gpu_count")] == "pass"
    assert ("node2", "cordoned") not in statuses
    assert "fan 2 dead" in (run_dir / "report.md").read_text()
