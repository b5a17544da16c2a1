"""validate on the 3-node sandbox: passes with reports; an impossible threshold fails by name."""

from __future__ import annotations

import json

import pytest

from dsk_provision.errors import RunFailed
from dsk_provision.inventory import load_inventory
from dsk_provision.validation.flow import validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inventory(bootstrapped_cluster):
    bootstrapped_cluster.require_success()
    return load_inventory(bootstrapped_cluster.info.inventory_path)


def test_validate_passes_with_reports(inventory, tmp_path):
    report = validate(inventory, runs_dir=tmp_path, end="1M")
    assert report.passed, [c.to_dict() for c in report.failures]
    run_dir = report.run_dir
    assert run_dir.parent == tmp_path
    data = json.loads((run_dir / "report.json").read_text())
    assert data["passed"] is True
    assert data["profile"] == "cpu-sandbox"
    nodes = {c["node"] for c in data["checks"]}
    assert nodes == {"node1", "node2", "node3", "cluster"}
    for name in ("node1", "node2", "node3"):
        assert (run_dir / "facts" / f"{name}.json").is_file()
        assert (run_dir / "logs" / f"{name}.log").is_file()
        ssh = next(c for c in data["checks"] if c["node"] == name and c["check"] == "ssh_peers")
        assert ssh["status"] == "pass" and ssh["value"] == "2/2"
    bench = data["allreduce"]
    assert bench["world_size"] == 3 and bench["backend"] == "gloo"
    assert bench["wrong_total"] == 0
    assert bench["results"][-1]["size"] == 1 << 20
    markdown = (run_dir / "report.md").read_text()
    assert "**PASSED**" in markdown and "### node3" in markdown and "## All-reduce" in markdown
    # The compute benchmark ran on every node (on the CPU), the busbw plot was drawn.
    assert sorted(data["gpu_perf"]) == ["node1", "node2", "node3"]
    for name in ("node1", "node2", "node3"):
        by_check = {c["check"]: c for c in data["checks"] if c["node"] == name}
        assert by_check["matmul_tflops"]["status"] == "pass"
        assert by_check["copy_bandwidth"]["status"] == "pass"
        # CPU nodes: one process each, no GPU: skipped with a reason, never silently.
        assert by_check["allreduce_intra"]["status"] == "skip"
        assert by_check["nccl_tests"]["status"] == "skip"
        assert by_check["nvlink"]["message"] == "no GPU on this node"
    assert data["plots"] == ["allreduce_busbw.png"]
    assert (run_dir / "allreduce_busbw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_slow_link_is_isolated_to_its_node(inventory, sandbox_cluster, tmp_path):
    from dsk_provision import sandbox

    sandbox.set_link_rate(sandbox_cluster.name, "node2", "10mbit")
    try:
        with pytest.raises(RunFailed) as err:
            validate(inventory, runs_dir=tmp_path, begin="256K", end="256K", warmup=2,
                     iters=5, perf=False)
    finally:
        sandbox.set_link_rate(sandbox_cluster.name, "node2", None)
    assert "node2" in str(err.value) and "allreduce_isolation" in str(err.value)
    (run_dir,) = tmp_path.glob("*-validate")
    data = json.loads((run_dir / "report.json").read_text())
    assert data["isolation"]["slow_nodes"] == ["node2"]
    assert data["isolation"]["slow_links"] == []
    culprits = [c["node"] for c in data["checks"]
                if c["check"] == "allreduce_isolation" and c["status"] == "fail"]
    assert culprits == ["node2"]
    pairs = {tuple(p["nodes"]): p["slow"] for p in data["isolation"]["pairs"]}
    assert pairs == {("node1", "node2"): True, ("node2", "node3"): True,
                     ("node3", "node1"): False}
    assert "## Isolation" in (run_dir / "report.md").read_text()


def test_impossible_busbw_threshold_fails_naming_the_check(inventory, tmp_path):
    with pytest.raises(RunFailed) as err:
        validate(inventory, runs_dir=tmp_path, begin="64K", end="64K", perf=False,
                 isolate=False, thresholds={"allreduce_min_busbw_gbs": 1e6})
    assert "allreduce_busbw" in str(err.value)
    assert sorted(err.value.nodes) == ["node1", "node2", "node3"]
    (run_dir,) = tmp_path.glob("*-validate")
    data = json.loads((run_dir / "report.json").read_text())
    assert data["passed"] is False
    failed = [(c["node"], c["check"]) for c in data["checks"] if c["status"] == "fail"]
    assert failed == [("cluster", "allreduce_busbw")]
    assert "allreduce_busbw" in (run_dir / "report.md").read_text()
