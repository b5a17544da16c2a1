"""Checks: each one passes on healthy facts and fails, naming the node, on bad ones."""

from __future__ import annotations

import copy

import pytest

from dsk_provision.errors import InputError
from dsk_provision.inventory import Inventory, Node
from dsk_provision.validation import bench_checks, node_checks, profiles, results

FACTS = {
    "host": "node2",
    "hostname": "node2",
    "os": {"distribution": "Debian", "version": "12"},
    "kernel": "6.1.0",
    "cpus": 2,
    "mem_total_mb": 24000,
    "mem_available_mb": 20000,
    "disk_free_gb": {"/": 40.5, "/opt/dsk": 40.5},
    "gpus": {"declared": 0, "detected": 0, "models": []},
    "nvidia_driver": None,
    "python": {"path": "/opt/dsk/venv/bin/python", "version": "3.11.2", "torch": "2.13.0",
               "cuda_available": False},
    "time_synced": True,
    "ssh_peers": {"node1": True, "node3": True},
    "skipped": {},
}
SANDBOX = profiles.load_profile("cpu-sandbox")


def facts(**changes):
    out = copy.deepcopy(FACTS)
    out.update(changes)
    return out


def bench(busbw=0.5, wrong=0, world=3):
    def mode(w):
        return {"time_us": 100.0, "algbw_gbs": busbw / 1.333, "busbw_gbs": busbw, "wrong": w}
    return {"world_size": world, "backend": "gloo", "wrong_total": wrong,
            "results": [{"size": 1024, "count": 256, "type": "float", "redop": "sum",
                         "out_of_place": mode(0), "in_place": mode(0)},
                        {"size": 16 << 20, "count": 4 << 20, "type": "float", "redop": "sum",
                         "out_of_place": mode(wrong), "in_place": mode(0)}]}


@pytest.mark.parametrize("name", [n for n in node_checks.NODE_CHECKS
                                  if n not in node_checks.GPU_NODE_CHECKS])
def test_every_node_check_passes_on_healthy_facts(name):
    result = node_checks.NODE_CHECKS[name](facts(), SANDBOX)
    assert result.status == "pass", result
    assert result.node == "node2"


@pytest.mark.parametrize("name", node_checks.GPU_NODE_CHECKS)
def test_gpu_checks_skip_with_a_reason_on_a_cpu_node(name):
    result = node_checks.NODE_CHECKS[name](facts(), SANDBOX)
    assert result.status == "skip", result
    assert result.message and result.node == "node2"


@pytest.mark.parametrize("name, bad_facts, bad_thresholds, words", [
    ("gpu_count", {"gpus": {"declared": 8, "detected": 7, "models": ["H100"] * 7}}, {},
     "7 GPU(s) detected, 8 declared"),
    ("python_env", {"python": {"path": "/p", "version": "3.11", "torch": None}}, {},
     "torch is not importable"),
    ("python_env", {}, {"require_cuda": True}, "does not see CUDA"),
    ("disk_free", {}, {"min_disk_free_gb": {"/": 10**9}}, "/: 40.5 GB free"),
    ("mem_available", {}, {"min_mem_available_mb": 10**12}, "20000 MB available"),
    ("ssh_peers", {"ssh_peers": {"node1": True, "node3": False}}, {}, "node3"),
    ("time_synced", {"time_synced": False}, {"require_time_sync": True}, "not synchronised"),
])
def test_each_node_check_can_fail_naming_the_node(name, bad_facts, bad_thresholds, words):
    result = node_checks.NODE_CHECKS[name](facts(**bad_facts), {**SANDBOX, **bad_thresholds})
    assert result.status == "fail"
    assert result.node == "node2"
    assert words in result.message


def test_unknown_time_sync_is_a_skip_with_reason():
    result = node_checks.check_time_synced(facts(time_synced=None), SANDBOX)
    assert result.status == "skip" and "unknown" in result.message


def test_unsynchronised_clock_is_shown_not_judged_when_not_required():
    result = node_checks.check_time_synced(facts(time_synced=False), {"require_time_sync": False})
    assert result.status == "skip" and result.value is False


def test_role_skips_are_reported_with_reason():
    results = node_checks.run_node_checks("node2", facts(skipped={"time_synced": "no chrony"}),
                                     SANDBOX)
    skipped = [r for r in results if r.check == "time_synced"]
    assert skipped[0].status == "skip" and skipped[0].message == "no chrony"


def test_missing_facts_fail_naming_node():
    (result,) = node_checks.run_node_checks("node3", None, SANDBOX)
    assert result.status == "fail" and result.node == "node3" and result.check == "facts"


def test_allreduce_correct_pass_and_fail():
    assert bench_checks.check_allreduce_correct(bench(), SANDBOX).status == "pass"
    bad = bench_checks.check_allreduce_correct(bench(wrong=5), SANDBOX)
    assert bad.status == "fail" and "5 wrong" in bad.message and "16777216 B" in bad.message


def test_allreduce_busbw_uses_largest_size_and_can_fail():
    ok = bench_checks.check_allreduce_busbw(bench(busbw=0.5), SANDBOX, nodes=3)
    assert ok.status == "pass" and ok.value == 0.5
    bad = bench_checks.check_allreduce_busbw(bench(busbw=0.5), {"allreduce_min_busbw_gbs": 10**6},
                                       nodes=3)
    assert bad.status == "fail" and bad.node == results.CLUSTER
    assert "16777216 B" in bad.message


def test_single_node_threshold_is_used_for_one_node():
    profile = profiles.load_profile("h100-sxm-8")
    assert bench_checks.busbw_threshold(profile, 1) == 315
    assert bench_checks.busbw_threshold(profile, 2) == 280


def test_one_rank_busbw_is_skipped():
    assert bench_checks.check_allreduce_busbw(bench(world=1), SANDBOX, nodes=1).status == "skip"


def test_profiles_load_and_cover_the_gpu_kinds():
    names = set(profiles.profile_names())
    assert {"cpu-sandbox", "h100-sxm-8", "h200-sxm-8", "a100-sxm-8"} <= names
    for name in profiles.profile_names():
        profile = profiles.read_profile(name)
        assert profile["thresholds"]["allreduce_max_wrong"] == 0
        assert "allreduce_min_busbw_gbs" in profile["thresholds"]


def inventory(tmp_path, gpus=0, **all_vars):
    node = Node("node1", "10.0.0.1", 22, "root", gpus, dict(all_vars))
    return Inventory(path=tmp_path / "hosts.yml", nodes=[node], vars=dict(all_vars),
                     hosts_file=tmp_path / "hosts.yml")


def test_inventory_thresholds_override_profile(tmp_path):
    inv = inventory(tmp_path, dsk_profile="h100-sxm-8",
                    dsk_thresholds={"allreduce_min_busbw_gbs": 100,
                                    "min_disk_free_gb": {"/opt/dsk": 2000}})
    name, merged = profiles.resolve_thresholds(inv, {"min_mem_available_mb": 1})
    assert name == "h100-sxm-8"
    assert merged["allreduce_min_busbw_gbs"] == 100
    assert merged["min_disk_free_gb"] == {"/": 50, "/opt/dsk": 2000}
    assert merged["min_mem_available_mb"] == 1
    assert merged["require_cuda"] is True


def test_bad_threshold_names_field_and_file(tmp_path):
    inv = inventory(tmp_path, dsk_thresholds={"allreduce_min_busbw": 1})
    with pytest.raises(InputError) as err:
        profiles.resolve_thresholds(inv)
    assert "all.vars.dsk_thresholds.allreduce_min_busbw" in str(err.value)
    assert str(tmp_path / "hosts.yml") in str(err.value)
    inv = inventory(tmp_path, dsk_thresholds={"min_mem_available_mb": "lots"})
    with pytest.raises(InputError, match="min_mem_available_mb"):
        profiles.resolve_thresholds(inv)


def test_unknown_profile_and_gpu_nodes_without_profile(tmp_path):
    with pytest.raises(InputError, match="dsk_profile"):
        profiles.resolve_thresholds(inventory(tmp_path, dsk_profile="tpu-v5"))
    with pytest.raises(InputError, match="dsk_profile"):
        profiles.resolve_thresholds(inventory(tmp_path, gpus=8))
    assert profiles.resolve_thresholds(inventory(tmp_path))[0] == "cpu-sandbox"
