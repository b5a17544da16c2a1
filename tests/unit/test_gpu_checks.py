"""GPU node checks, compute checks, nccl-tests parsing and isolation, from recorded outputs.

The fixtures under fixtures/gpu/ follow the documented formats of nvidia-smi
(--query-gpu/--query-remapped-rows with --format=csv,noheader,nounits, nvlink -s), the
kernel log's NVRM Xid lines, /sys/class/infiniband, /etc/nccl.conf, dcgmi diag and
nccl-tests' all_reduce_perf. Every check passes on a healthy 8x H200 node and fails,
naming the node, with a deliberately impossible threshold or a broken fact.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from helpers import node_module

from dsk_provision.inventory import Node
from dsk_provision.validation import bench_checks, isolation, node_checks, parsers, profiles

FIXTURES = Path(__file__).parent / "fixtures" / "gpu"
H200 = profiles.load_profile("h200-sxm-8")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def healthy() -> dict:
    return {
        "host": "gpu7",
        "mem_total_mb": 2_000_000, "mem_available_mb": 1_800_000,
        "disk_free_gb": {"/": 800.0, "/opt/dsk": 12000.0},
        "gpus": {"declared": 8, "detected": 8, "models": ["NVIDIA H200"] * 8},
        "nvidia_driver": "580.159.04",
        "python": {"path": "/opt/dsk/venv/bin/python", "version": "3.12.3",
                   "torch": "2.11.0", "cuda_available": True},
        "time_synced": True,
        "ssh_peers": {"gpu8": True},
        "gpu_stack": {
            "nvidia_smi": {"query": fixture("nvidia_smi_query_h200x8.csv"),
                           "query_fields": fixture("query_fields.txt").strip(),
                           "remapped_rows": fixture("remapped_rows_h200x8.csv"),
                           "nvlink": fixture("nvlink_s_h200x8.txt")},
            "cuda_version": "13.0.88",
            "nccl_version": "2.28.3-1+cuda13.0",
            "xid_lines": [],
            "dcgm_diag": fixture("dcgmi_diag_r1_pass.txt"),
            "infiniband": json.loads(fixture("infiniband_ndr8.json")),
            "nvidia_peermem": True,
            "nccl_settings": {"conf_path": "/etc/nccl.conf", "conf": fixture("nccl.conf"),
                              "env": {}},
            "systemd": True,
        },
        "skipped": {},
    }


NODE_VARS = {"nvidia_driver_branch": "580", "nvidia_driver_version": "580.159.04",
             "cuda_version": "13.0", "nccl_version": "2.28.3-1+cuda13.0",
             "dsk_socket_ifname": "eth0",
             "dsk_nccl_env": {"NCCL_IB_HCA": "mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,"
                                             "mlx5_6,mlx5_7"}}


def pins_of(**node_vars) -> dict:
    """What validate compares a node with, from the node's inventory variables."""
    node = Node("gpu7", "10.0.0.7", 22, "root", 8, {**NODE_VARS, **node_vars})
    return node_checks.node_pins(node)


PINS = pins_of()


def run(name: str, facts: dict, thresholds: dict | None = None, pins: dict | None = None):
    facts = {**facts, "pins": PINS if pins is None else pins}
    return node_checks.NODE_CHECKS[name](facts, {**H200, **(thresholds or {})})


# --------------------------------------------------------------------------- parsing


def test_parse_query_reads_every_gpu_and_field():
    rows = parsers.parse_gpu_query(fixture("nvidia_smi_query_h200x8.csv"),
                                  fixture("query_fields.txt").strip())
    assert len(rows) == 8
    assert rows[3]["pci.bus_id"] == "00000000:5D:00.0"
    assert rows[0]["persistence_mode"] == "Enabled"
    assert rows[0]["pcie.link.width.max"] == "16"
    assert parsers.clock_reasons(rows[0]["reasons"]) == ["gpu_idle"]


def test_unknown_values_and_clock_bits():
    rows = parsers.parse_gpu_query("0, X, b, 1, [N/A], [Not Supported], 1, 4, 8, 16, 0x48",
                                  fixture("query_fields.txt").strip())
    assert rows[0]["persistence_mode"] is None
    assert rows[0]["ecc.errors.uncorrected.volatile.total"] is None
    assert parsers.clock_reasons("0x48") == ["hw_slowdown", "hw_thermal_slowdown"]
    assert parsers.clock_reasons("0x1000") == ["unknown_0x1000"]


def test_parse_nvlink_counts_links_up_and_down():
    links = parsers.parse_nvlink(fixture("nvlink_s_h200x8.txt"))
    assert sorted(links) == list(range(8))
    assert links[5]["up"] == 18 and links[5]["down"] == 0
    broken = "GPU 0: NVIDIA H200 (UUID: x)\n\t Link 0: 26.562 GB/s\n\t Link 1: <inactive>\n"
    assert parsers.parse_nvlink(broken)[0] == {"up": 1, "down": 1, "gbs": [26.562]}


def test_parse_xid_lines():
    events = parsers.parse_xid(fixture("kernel_log_xid.txt").splitlines())
    assert [(e["pci"], e["xid"]) for e in events] == [("0000:2a:00", 79), ("0000:5d:00", 48)]


def test_parse_ib_dcgm_and_nccl_conf():
    assert parsers.parse_ib_rate("400 Gb/sec (4X NDR)") == 400.0
    assert parsers.parse_ib_state("4: ACTIVE") == "ACTIVE"
    assert parsers.parse_nccl_conf(fixture("nccl.conf"))["NCCL_SOCKET_IFNAME"] == "eth0"
    diag = parsers.parse_dcgm_diag(fixture("dcgmi_diag_r1_fail.txt"))
    assert diag["Page Retirement/Row Remap"].startswith("Fail")
    assert diag["Persistence Mode"] == "Pass"
    assert "DCGM Version" not in diag


def test_parse_nccl_tests_table():
    parsed = parsers.parse_nccl_tests(fixture("all_reduce_perf_8gpu.txt"))
    assert parsed["world_size"] == 8
    assert [r["size"] for r in parsed["results"]] == [1 << 20, 16 << 20, 256 << 20, 8 << 30]
    assert parsed["results"][-1]["in_place"]["busbw_gbs"] == 386.42
    assert parsed["wrong_total"] == 0 and parsed["avg_busbw_gbs"] == 249.636


def test_health_check_module_reads_infiniband_sysfs(tmp_path):
    module = node_module(Path(__file__).parents[2] / "roles/health_check/library/dsk_node_facts.py")
    port = tmp_path / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (port / "link_layer").write_text("InfiniBand\n")
    assert module.infiniband_ports(str(tmp_path)) == {
        "mlx5_0/1": {"state": "4: ACTIVE", "rate": "400 Gb/sec (4X NDR)",
                     "link_layer": "InfiniBand"}}
    assert module.infiniband_ports(str(tmp_path / "absent")) is None


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize("name", node_checks.GPU_NODE_CHECKS)
def test_every_gpu_check_passes_on_a_healthy_h200_node(name):
    result = run(name, healthy())
    assert result.status == "pass", result
    assert result.node == "gpu7"


def _query(**columns) -> str:
    """The recorded query with some columns of GPU 3 replaced."""
    fields = fixture("query_fields.txt").strip().split(",")
    lines = fixture("nvidia_smi_query_h200x8.csv").strip().splitlines()
    cells = [c.strip() for c in lines[3].split(",")]
    for name, value in columns.items():
        cells[fields.index(name)] = value
    lines[3] = ", ".join(cells)
    return "\n".join(lines) + "\n"


IMPOSSIBLE = [
    ("gpu_model", {}, {"gpu_model": "B300"}, None, "is not B300"),
    ("driver_version", {}, {}, {**PINS, "nvidia_driver_version": "999.1.1"}, "999.1.1 pinned"),
    ("driver_version", {}, {}, {"nvidia_driver_branch": "999"}, "branch 999"),
    ("cuda_version", {}, {}, {**PINS, "cuda_version": "99.9"}, "99.9 pinned"),
    ("nccl_version", {}, {}, {**PINS, "nccl_version": "9.9.9-1+cuda99.9"}, "pinned"),
    ("persistence_mode", {"gpu_stack.nvidia_smi.query": _query(persistence_mode="Disabled")},
     {}, None, "off on GPU 3"),
    ("ecc_errors", {}, {"max_ecc_uncorrected": -1}, None, "GPU 3: 0"),
    ("ecc_errors", {"gpu_stack.nvidia_smi.query":
                    _query(**{"ecc.errors.uncorrected.volatile.total": "2"})},
     {}, None, "GPU 3: 2"),
    ("remapped_rows", {"gpu_stack.nvidia_smi.remapped_rows":
                       "00000000:18:00.0, 0, 0\n00000000:5D:00.0, 1, 0\n"},
     {}, None, "00000000:5D:00.0: pending 1"),
    ("xid_errors", {}, {"max_xid_errors": -1}, None, "no XID"),
    ("xid_errors", {"gpu_stack.xid_lines": fixture("kernel_log_xid.txt").splitlines()},
     {}, None, "XID 48, 79"),
    ("clock_throttle", {}, {"throttle_reasons_allowed": []}, None, "GPU 0: gpu_idle"),
    ("clock_throttle", {"gpu_stack.nvidia_smi.query": _query(
        **{"clocks_event_reasons.active": "0x0000000000000040"})}, {}, None,
     "GPU 3: hw_thermal_slowdown"),
    ("pcie_link", {}, {"pcie_min_width": 32}, None, "x16 < x32"),
    ("pcie_link", {}, {"pcie_min_gen": 7}, None, "Gen5 capable < Gen7"),
    ("pcie_link", {"gpu_stack.nvidia_smi.query": _query(**{"pcie.link.width.current": "8"})},
     {}, None, "GPU 3: x8 of x16 lanes"),
    ("nvlink", {}, {"nvlink_min_links_up": 19}, None, "GPU 0: 18 up"),
    ("infiniband", {}, {"ib_min_ports_active": 9}, None, "8 port(s) ACTIVE < 9"),
    ("infiniband", {}, {"ib_min_rate_gbps": 800}, None, "slower than 800 Gb/s"),
    ("infiniband", {"gpu_stack.infiniband": None}, {}, None, "8 port(s) expected"),
    ("gpudirect_rdma", {"gpu_stack.nvidia_peermem": False}, {}, None, "nvidia_peermem"),
    ("nccl_settings", {}, {}, pins_of(dsk_socket_ifname="ib0"),
     "NCCL_SOCKET_IFNAME=eth0 (want ib0)"),
    ("nccl_settings", {"gpu_stack.nccl_settings": {"conf": None, "env": {}}}, {}, None,
     "no NCCL settings"),
    ("dcgm_diag", {"gpu_stack.dcgm_diag": fixture("dcgmi_diag_r1_fail.txt")}, {}, None,
     "Page Retirement/Row Remap: Fail - GPU 3"),
]


@pytest.mark.parametrize("name, changes, thresholds, pins, words", IMPOSSIBLE)
def test_each_gpu_check_can_fail_naming_the_node(name, changes, thresholds, pins, words):
    facts = healthy()
    for path, value in changes.items():
        facts = _apply(facts, path, value)
    result = run(name, facts, thresholds, pins)
    assert result.status == "fail", result
    assert result.node == "gpu7"
    assert words in result.message


def _apply(facts, path, value):
    facts = copy.deepcopy(facts)
    target = facts
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return facts


def test_every_gpu_check_is_proven_able_to_fail():
    assert {case[0] for case in IMPOSSIBLE} == set(node_checks.GPU_NODE_CHECKS)


def test_missing_tools_are_skips_with_reasons():
    facts = _apply(healthy(), "gpu_stack.dcgm_diag", None)
    facts["skipped"] = {"dcgm_diag": "dcgmi is not installed (DCGM)",
                        "xid_errors": "kernel log unreadable (dmesg: Operation not permitted)"}
    facts = _apply(facts, "gpu_stack.xid_lines", None)
    assert run("dcgm_diag", facts).message == "dcgmi is not installed (DCGM)"
    assert run("dcgm_diag", facts).status == "skip"
    assert run("xid_errors", facts).status == "skip"
    assert "Operation not permitted" in run("xid_errors", facts).message
    no_hca = _apply(healthy(), "gpu_stack.infiniband", None)
    assert run("gpudirect_rdma", no_hca).status == "skip"
    assert run("infiniband", no_hca, {"ib_min_ports_active": 0}).status == "skip"
    assert run("driver_version", healthy(), pins={}).status == "skip"


def test_gpu_node_without_nvidia_smi_fails_with_the_reason():
    facts = _apply(healthy(), "gpu_stack.nvidia_smi", {"query": None})
    facts["skipped"] = {"nvidia_smi": "nvidia-smi is not installed"}
    result = run("persistence_mode", facts)
    assert result.status == "fail" and result.message == "nvidia-smi is not installed"


def test_run_node_checks_passes_pins_through():
    results = node_checks.run_node_checks("gpu7", healthy(), H200, PINS)
    by = {r.check: r for r in results}
    assert by["driver_version"].status == "pass"
    failed = node_checks.run_node_checks("gpu7", healthy(), H200, {"cuda_version": "12.8"})
    assert {r.check: r for r in failed}["cuda_version"].status == "fail"


def test_pins_the_inventory_leaves_unset_are_the_defaults_bootstrap_installs():
    from dsk_provision.defaults import resolve

    node = Node("gpu7", "10.0.0.7", 22, "root", 8, {})
    pins = node_checks.node_pins(node)
    assert pins["nvidia_driver_branch"] == resolve("nvidia_driver_branch")
    assert pins["cuda_version"] == resolve("cuda_version")
    assert pins["nccl_version"] == resolve("nccl_version", role="nccl")
    assert "nvidia_driver_version" not in pins  # empty by default: any release of the branch
    assert node_checks.node_pins(Node("gpu7", "10.0.0.7", 22, "root", 8,
                                      {"cuda_version": "12.8"}))["nccl_version"].endswith(
        "+cuda12.8")


# --------------------------------------------------------------------------- compute checks

PERF = {"device": "cuda", "matmul": {"size": 8192, "dtype": "bfloat16"}, "copy_bytes": 4 << 30,
        "devices": [{"index": i, "name": "NVIDIA H200", "matmul_tflops": 800.0 - i,
                     "copy_gbs": 4300.0 - i} for i in range(8)]}


def test_perf_checks_pass_and_name_the_slowest_device():
    matmul, copy_bw = bench_checks.run_perf_checks("gpu7", PERF, H200)
    assert matmul.status == copy_bw.status == "pass"
    assert matmul.value == 793.0 and copy_bw.value == 4293.0


@pytest.mark.parametrize("key, check", [("matmul_min_tflops", "matmul_tflops"),
                                        ("copy_min_gbs", "copy_bandwidth")])
def test_perf_checks_fail_with_an_impossible_threshold(key, check):
    results = {r.check: r for r in bench_checks.run_perf_checks("gpu7", PERF, {**H200, key: 1e9})}
    assert results[check].status == "fail"
    assert results[check].node == "gpu7" and "NVIDIA H200 7" in results[check].message


def test_perf_checks_of_a_cpu_node_say_its_dtype_and_no_index():
    """A CPU node's probe multiplies in float32, as the trainer computes there."""
    perf = {"device": "cpu", "matmul": {"size": 512, "dtype": "float32"}, "copy_bytes": 64 << 20,
            "devices": [{"index": 0, "name": "CPU (2 threads)", "matmul_tflops": 0.003,
                         "copy_gbs": 10.0}]}
    matmul, _ = bench_checks.run_perf_checks("node1", perf, {"matmul_min_tflops": 0.004,
                                                             "copy_min_gbs": 2})
    assert matmul.status == "fail"
    assert matmul.message == ("float32 matmul 0.003 TFLOP/s < 0.004 TFLOP/s on "
                              "CPU (2 threads)")


def test_perf_checks_fail_without_a_result():
    results = bench_checks.run_perf_checks("gpu7", None, H200, error="torchrun failed on gpu7")
    assert [r.status for r in results] == ["fail", "fail"]
    assert results[0].message == "torchrun failed on gpu7"


# --------------------------------------------------------------------------- isolation


def test_ring_pairs_and_rounds():
    names = ["n1", "n2", "n3", "n4"]
    pairs = isolation.ring_pairs(names)
    assert pairs == [("n1", "n2"), ("n2", "n3"), ("n3", "n4"), ("n4", "n1")]
    assert isolation.rounds(pairs) == [[("n1", "n2"), ("n3", "n4")], [("n2", "n3"), ("n4", "n1")]]
    assert len(isolation.rounds(isolation.ring_pairs(["a", "b", "c"]))) == 3
    assert isolation.ring_pairs(["a", "b"]) == [("a", "b")]
    assert isolation.ring_pairs(["a"]) == []


@pytest.mark.parametrize("count", [3, 4, 7, 16])
def test_isolation_names_the_slow_node(count):
    names = [f"n{i}" for i in range(count)]
    slow = names[count // 2]
    measured = []

    def measure(pair):
        measured.append(pair)
        return 0.001 if slow in pair else 0.5

    verdict = isolation.isolate(names, measure, 0.05)
    assert verdict.slow_nodes == [slow]
    assert verdict.slow_links == []
    assert len(measured) == count


def test_isolation_names_a_slow_link_and_a_failed_run():
    names = ["a", "b", "c", "d"]
    verdict = isolation.judge(names, {("a", "b"): 0.5, ("b", "c"): 0.001, ("c", "d"): 0.5,
                                    ("d", "a"): 0.5}, 0.05)
    assert verdict.slow_nodes == [] and verdict.slow_links == [("b", "c")]
    verdict = isolation.judge(names, {("a", "b"): 0.5, ("b", "c"): None, ("c", "d"): None,
                                    ("d", "a"): 0.5}, 0.05)
    assert verdict.slow_nodes == ["c"]
    two = isolation.judge(["a", "b"], {("a", "b"): 0.001}, 0.05)
    assert two.slow_nodes == [] and two.slow_links == [("a", "b")]


def test_isolation_names_nobody_when_every_pair_is_slow():
    verdict = isolation.isolate(["a", "b", "c"], lambda pair: 0.001, 0.05)
    assert verdict.all_slow and verdict.slow_nodes == [] and verdict.slow_links == []


def test_isolation_tolerates_noise_below_the_threshold():
    # Small messages: the healthy pair misses the absolute threshold, but is 40x faster.
    verdict = isolation.judge(["node1", "node2", "node3"],
                            {("node1", "node2"): 0.001, ("node2", "node3"): 0.001,
                             ("node3", "node1"): 0.040}, 0.05)
    assert verdict.slow_nodes == ["node2"] and not verdict.all_slow
    two = isolation.judge(["a", "b"], {("a", "b"): 0.04}, 0.05)
    assert two.slow_links == [("a", "b")]


def test_a_node_blamed_alone_gets_the_command_that_cordons_it():
    verdict = isolation.isolate(["a", "b", "c"], lambda pair: 0.001 if "b" in pair else 0.5,
                                0.05)
    checks = isolation.isolation_checks(verdict, ["a", "b", "c"], 0.05, "inv/prod")
    (blamed,) = [c for c in checks if c.node == "b"]
    assert blamed.message.endswith(
        "dsk-provision nodes cordon -i inv/prod b --reason 'slow all-reduce'")
    without = isolation.isolation_checks(verdict, ["a", "b", "c"], 0.05)
    assert "cordon" not in without[0].message
