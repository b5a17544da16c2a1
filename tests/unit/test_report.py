"""Reports: JSON and Markdown from one dict, written whole."""

from __future__ import annotations

import json

from dsk_provision import report
from dsk_provision.checks import CheckResult
from dsk_provision.validate import ValidationReport


def sample(tmp_path, busbw_status="pass"):
    checks = [
        CheckResult("node1", "gpu_count", "pass", 0, 0, "0 GPU(s) as declared (no GPUs)"),
        CheckResult("node1", "disk_free", "pass", {"/": 40.5}, {"/": 1}, "enough free space"),
        CheckResult("node2", "time_synced", "skip", None, True, "unknown"),
        CheckResult("node2", "ssh_peers", "fail", "1/2", "all", "cannot reach by SSH: node3"),
        CheckResult("cluster", "allreduce_busbw", busbw_status, 0.61, 0.05, "busbw 0.61 GB/s"),
    ]
    bench = {"world_size": 2, "backend": "gloo", "nccl": None, "torch": "2.13.0", "warmup": 5,
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
