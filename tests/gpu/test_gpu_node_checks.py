"""The health_check module and the GPU node checks on this machine's real GPUs.

The module is run directly (as Ansible would run it), its raw outputs parsed by
dsk_provision.validation; the whole `validate` then runs with a local connection where
ansible-runner is installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from dsk_provision.validation import node_checks, parsers, profiles

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu


def _module():
    import ansible.module_utils

    # The module imports ansible.module_utils.dsk_pci, shipped from the repo's module_utils.
    if str(REPO / "module_utils") not in ansible.module_utils.__path__:
        ansible.module_utils.__path__.append(str(REPO / "module_utils"))
    path = REPO / "roles/health_check/library/dsk_node_facts.py"
    spec = importlib.util.spec_from_file_location("dsk_node_facts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def facts() -> dict:
    """This machine's node facts, gathered once by the health_check module."""
    import torch

    pytest.importorskip("ansible", reason="ansible-core is not installed")
    count = torch.cuda.device_count()
    return _module().gather({
        "host": "local", "gpus_declared": count, "dsk_root": "/tmp", "python": sys.executable,
        "python_timeout": 120, "ssh_peers": [], "check_ssh": False, "ssh_timeout": 5,
        "sysfs_pci_root": "/sys/bus/pci/devices", "cuda_home": "/usr/local/cuda",
        "nccl_conf": "/etc/nccl.conf", "dcgm_level": 1, "dcgm_timeout": 600})


def test_node_facts_and_gpu_checks_on_this_machine(facts, gpu_out):
    import torch

    count = torch.cuda.device_count()
    (gpu_out / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    smi = facts["gpu_stack"]["nvidia_smi"]
    rows = parsers.parse_gpu_query(smi["query"], smi["query_fields"])
    assert len(rows) == count, facts["skipped"]
    assert all(r["name"] and r["driver_version"] for r in rows)
    results = node_checks.run_node_checks("local", facts, profiles.load_profile("h200-sxm-8"))
    (gpu_out / "checks.json").write_text(json.dumps([r.to_dict() for r in results], indent=2))
    by = {r.check: r for r in results}
    for name in node_checks.GPU_NODE_CHECKS:
        assert by[name].message, by[name]
        assert by[name].message != "no GPU on this node"
    assert by["gpu_count"].status == "pass"


def test_every_gpu_lists_its_nvlink_links(facts):
    """nvidia-smi nvlink -s lists every GPU, where there is NVLink to list: a machine with
    one GPU has no peer to link to (and a PCIe GPU lists nothing), so there it skips."""
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"{count} GPU on this machine: NVLink needs a peer GPU, nothing to check")
    smi = facts["gpu_stack"]["nvidia_smi"]
    if smi["nvlink"] is None:
        reason = facts["skipped"].get("nvlink", "nvidia-smi said nothing")
        pytest.skip(f"no NVLink report: {reason}")
    assert set(parsers.parse_nvlink(smi["nvlink"])) == set(range(count))


def test_validate_with_a_local_connection(gpu_out, tmp_path):
    import torch

    pytest.importorskip("ansible_runner", reason="ansible-runner is not installed")
    if not shutil.which("ansible-playbook"):
        pytest.skip("ansible-playbook is not on PATH")
    from dsk_provision.errors import RunFailed
    from dsk_provision.inventory import load_inventory
    from dsk_provision.validation.flow import validate

    count = torch.cuda.device_count()
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_cluster_name": "gpu-local", "dsk_profile": "h200-sxm-8",
                 "dsk_gpus_per_node": count, "dsk_python": sys.executable,
                 "dsk_root": str(tmp_path / "dsk"), "ansible_connection": "local",
                 "ansible_python_interpreter": sys.executable,
                 "health_check_ssh_peers": False},
        "children": {"nodes": {"hosts": {"gpu1": {"ansible_host": "127.0.0.1"}}}}}}))
    inventory = load_inventory(hosts)
    try:
        report = validate(inventory, runs_dir=tmp_path / "runs", begin="1M", end="1G")
    except RunFailed as exc:
        report = exc.report
    (gpu_out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    by = {(c.node, c.check): c for c in report.checks}
    assert by[("gpu1", "gpu_count")].status == "pass"
    assert by[("gpu1", "matmul_tflops")].value and by[("gpu1", "copy_bandwidth")].value
    assert report.allreduce and report.allreduce["world_size"] == count
    assert (report.run_dir / "allreduce_busbw.png").is_file()
