"""Static checks of the GPU roles (nvidia_driver, fabric_manager, cuda, nccl, rdma,
containers, nccl_tests) and playbooks/components/gpu_stack.yml, and their input validation at run
time: a wrongly typed or misspelled value stops the role before any task runs, and a
pin that cannot work fails with a message naming the variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, ROLES, node_module, run_role, tool

GPU_ROLES = ["nvidia_driver", "fabric_manager", "cuda", "nccl", "rdma", "containers",
             "nccl_tests"]
GPU_STACK = "playbooks/components/gpu_stack.yml"
PATHS = [f"roles/{r}" for r in GPU_ROLES] + [GPU_STACK]


def test_yamllint_clean():
    proc = subprocess.run([tool("yamllint"), "-s", *PATHS, "inventory/gpu-h200-local"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
# ansible-lint's production profile covers these roles and gpu_stack.yml in
# test_roles_static.py::test_ansible_lint_production_clean (playbooks and roles, whole).


def test_playbook_runs_the_roles_in_order_with_a_tag_each():
    [play] = yaml.safe_load((REPO / GPU_STACK).read_text())
    includes = [t for t in play["tasks"] if "ansible.builtin.include_role" in t
                and "tasks_from" not in t["ansible.builtin.include_role"]]
    assert [t["ansible.builtin.include_role"]["name"] for t in includes] == GPU_ROLES
    for task in includes:
        role = task["ansible.builtin.include_role"]["name"]
        assert task["tags"] == ["gpu_stack", role]
        assert task["ansible.builtin.include_role"]["apply"] == {"tags": ["gpu_stack", role]}
    assert "serial" in play


def test_gpu_only_roles_are_included_only_where_they_apply():
    """A CPU node skips each GPU-only role with one evaluation, and is told why."""
    [play] = yaml.safe_load((REPO / GPU_STACK).read_text())
    whens = {t["ansible.builtin.include_role"]["name"]: t.get("when", "")
             for t in play["tasks"] if "ansible.builtin.include_role" in t
             and "tasks_from" not in t["ansible.builtin.include_role"]}
    for role in ("nvidia_driver", "cuda", "nccl_tests"):
        assert "gpu_stack_has_gpu" in whens[role] and "_force" in whens[role], role
    assert "cuda_hw_nvswitch" in whens["fabric_manager"]
    for role in ("nccl", "rdma", "containers"):  # parts of them apply to every node
        assert whens[role] == "", role
    skipped = play["vars"]["gpu_stack_skipped"]
    for role in ("nvidia_driver", "fabric_manager", "cuda", "nccl_tests"):
        assert f"['{role} (" in skipped, role


@pytest.mark.parametrize("role", GPU_ROLES)
def test_role_has_vars_for_every_supported_distribution(role):
    for name in ("Ubuntu-22.04", "Ubuntu-24.04", "Debian-12"):
        assert (ROLES / role / "vars" / f"{name}.yml").is_file(), (role, name)


BAD_ARGUMENTS = [
    ("nvidia_driver", {"nvidia_driver_source": "cuda-rep"}, "nvidia_driver_source"),
    ("nvidia_driver", {"nvidia_driver_allow_reboot": "maybe"}, "nvidia_driver_allow_reboot"),
    ("fabric_manager", {"fabric_manager_force": "perhaps"}, "fabric_manager_force"),
    ("cuda", {"cuda_packages": {"cuda-toolkit-13-0": "13.0.2"}}, "cuda_packages"),
    ("nccl", {"nccl_conf_extra": ["NCCL_DEBUG=INFO"]}, "nccl_conf_extra"),
    ("rdma", {"rdma_stack": "doca"}, "rdma_stack"),
    ("containers", {"containers_runtime": "dockr"}, "containers_runtime"),
    ("nccl_tests", {"nccl_tests_make_jobs": "many"}, "nccl_tests_make_jobs"),
]


@pytest.mark.parametrize(("role", "extra", "variable"), BAD_ARGUMENTS,
                         ids=[f"{r}-{v}" for r, _, v in BAD_ARGUMENTS])
def test_argument_specs_reject_bad_values_before_any_task(tmp_path, role, extra, variable):
    proc = run_role(tmp_path, role, extra)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Validation of arguments failed" in out, out[-3000:]
    assert variable in out, out[-3000:]
    tasks = [line for line in out.splitlines() if line.startswith("TASK [")]
    assert len(tasks) == 1 and "Validating arguments against arg spec" in tasks[0], tasks


BAD_PINS = [
    ("cuda", {"cuda_version": "12.1", "cuda_force": True}, "cuda_version=12.1"),
    ("nccl", {"nccl_version": "2.28.3-1+cuda12.9", "cuda_version": "13.0", "nccl_force": True},
     "nccl_version=2.28.3-1+cuda12.9"),
    ("nvidia_driver", {"nvidia_driver_version": "570.86.15", "nvidia_driver_force": True},
     "nvidia_driver_version=570.86.15"),
    ("nccl", {"dsk_nccl_env": {"nccl_debug": "INFO"}}, "dsk_nccl_env.nccl_debug"),
    ("rdma", {"rdma_distro_packages": [], "rdma_ipoib_enabled": True,
              "rdma_ipoib_interfaces": [{"device": "ib0", "address": "10.10.0.11"}]},
     'rdma_ipoib_interfaces: {"address": "10.10.0.11", "device": "ib0"}'),
]


@pytest.mark.parametrize(("role", "extra", "message"), BAD_PINS, ids=[m for *_, m in BAD_PINS])
def test_inconsistent_pins_fail_naming_the_variable(tmp_path, role, extra, message):
    proc = run_role(tmp_path, role, extra)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert message in out, out[-3000:]
    assert "changed: [" not in out, out[-3000:]


def test_misspelled_knob_stops_the_playbook_before_any_role(tmp_path):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"nodes": {
        "hosts": {"localnode": {"ansible_connection": "local",
                                "ansible_python_interpreter": sys.executable,
                                "nccl_verison": "2.28.3-1+cuda13.0",
                                "nccl_version": "2.28.3-1+cuda13.0"}}}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "ltmp"))
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"),
                           str(REPO / "playbooks/site.yml"), "--tags", "gpu_stack", "--check"],
                          cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Unknown variables nccl_verison:" in out, out[-3000:]
    assert "nccl_version" not in out.split("Unknown variables")[1].split(":")[0]  # known
    assert "TASK [nvidia_driver" not in out, out[-3000:]


def test_good_values_get_past_validation_and_skip_with_reasons(tmp_path):
    """The control case: valid values on this machine (no NVIDIA GPU) skip, saying why."""
    if any((Path("/sys/bus/pci/devices") / d / "vendor").read_text().strip() == "0x10de"
           for d in os.listdir("/sys/bus/pci/devices")):
        pytest.skip("this machine has NVIDIA devices")
    proc = run_role(tmp_path, "cuda", {"cuda_version": "13.0"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Skipping the CUDA toolkit: no NVIDIA GPU on this node" in out, out[-3000:]


def _node_state_probe():
    return node_module(REPO / "library/dsk_gpu_node_state.py").probe


def _fake_node(root: Path, pci: dict[str, tuple[str, str]], dev: list[str], ib: list[str],
               version: str | None, modprobe: bool) -> dict:
    for address, (vendor, pci_class) in pci.items():
        (root / "pci" / address).mkdir(parents=True)
        (root / "pci" / address / "vendor").write_text(vendor + "\n")
        (root / "pci" / address / "class").write_text(pci_class + "\n")
    (root / "dev").mkdir()
    for name in dev:
        (root / "dev" / name).write_text("")
    for name in ib:
        (root / "ib" / name).mkdir(parents=True)
    if version is not None:
        (root / "version").write_text(version)
    if modprobe:
        (root / "modprobe").write_text("")
    return {"sysfs_pci": str(root / "pci"), "dev_dir": str(root / "dev"),
            "infiniband_dir": str(root / "ib"), "driver_version_file": str(root / "version"),
            "modprobe_paths": [str(root / "missing-modprobe"), str(root / "modprobe")]}


def test_node_state_probe_on_a_gpu_node(tmp_path):
    params = _fake_node(
        tmp_path,
        {"0000:18:00.0": ("0x10de", "0x030200"), "0000:19:00.0": ("0x10de", "0x030000"),
         "0000:1a:00.0": ("0x10de", "0x068000"), "0000:00:01.0": ("0x8086", "0x030000")},
        dev=["nvidia0"], ib=["mlx5_1", "mlx5_0"],
        version="NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  "
                "Release Build\n",
        modprobe=True)
    assert _node_state_probe()(params) == {
        "gpu_count": 2, "nvswitch": True, "rdma_devices": ["mlx5_0", "mlx5_1"],
        "driver_loaded": "580.95.05", "modprobe": str(tmp_path / "modprobe")}


def test_node_state_probe_on_a_bare_node(tmp_path):
    params = _fake_node(tmp_path, {"0000:00:01.0": ("0x1af4", "0x020000")}, dev=["null"],
                        ib=[], version=None, modprobe=False)
    params["infiniband_dir"] = str(tmp_path / "no-such-class")
    assert _node_state_probe()(params) == {
        "gpu_count": 0, "nvswitch": False, "rdma_devices": [], "driver_loaded": "",
        "modprobe": ""}
    # An NVSwitch without a PCI bridge of class 0x0680 still shows up as a device node.
    (tmp_path / "dev/nvidia-nvswitch0").write_text("")
    assert _node_state_probe()(params)["nvswitch"] is True


# Ansible's own steps for a play's batches: template the play's keywords with the
# play-level variables, then split the hosts by serial (PlaybookExecutor.run). HostVars
# exist once an earlier play ran, as site.yml's inventory check does before this play.
SERIAL_BATCHES = """\
import json, sys
from ansible.plugins.loader import init_plugin_loader
init_plugin_loader()
from ansible.executor.playbook_executor import PlaybookExecutor
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.playbook import Playbook
from ansible.template import Templar
from ansible.vars.hostvars import HostVars
from ansible.vars.manager import VariableManager
playbook, after_a_play, *inventories = sys.argv[1:]
out = []
for source in inventories:
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[source])
    variables = VariableManager(loader=loader, inventory=inventory)
    if after_a_play == "yes":
        HostVars(inventory=inventory, variable_manager=variables, loader=loader)
    play = Playbook.load(playbook, variable_manager=variables, loader=loader).get_plays()[0]
    play.post_validate(Templar(loader=loader, variables=variables.get_vars(play=play)))
    executor = PlaybookExecutor.__new__(PlaybookExecutor)
    executor._inventory = inventory
    out.append([len(batch) for batch in executor._get_serialized_batches(play)])
print(json.dumps(out))
"""


def gpu_stack_batches(tmp_path: Path, cases: list[dict], after_a_play: bool = True) -> list:
    """The GPU stack play's batch sizes on four nodes, one inventory per case (all.vars)."""
    script = tmp_path / "batches.py"
    script.write_text(SERIAL_BATCHES)
    sources = []
    for i, all_vars in enumerate(cases):
        source = tmp_path / f"hosts{i}.yml"
        source.write_text(yaml.safe_dump({"all": {"vars": all_vars, "children": {"nodes": {
            "hosts": {name: {} for name in ("n1", "n2", "n3", "n4")}}}}}))
        sources.append(str(source))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROLES), ANSIBLE_LOCAL_TEMP=str(tmp_path / "ltmp"))
    proc = subprocess.run([sys.executable, str(script), str(REPO / GPU_STACK),
                           "yes" if after_a_play else "no", *sources],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_driver_reboots_roll_one_node_at_a_time_unless_the_inventory_says_otherwise(tmp_path):
    cases = [
        {},                                                      # no reboots: all at once
        {"nvidia_driver_allow_reboot": True},                    # reboots: one at a time
        {"nvidia_driver_allow_reboot": "false"},
        {"dsk_gpu_stack_serial": 2},                             # explicit values win
        {"nvidia_driver_allow_reboot": True, "dsk_gpu_stack_serial": 2},
        {"nvidia_driver_allow_reboot": True, "dsk_gpu_stack_serial": "100%"},
    ]
    assert gpu_stack_batches(tmp_path, cases) == [
        [4], [1, 1, 1, 1], [4], [2, 2], [2, 2], [4]]


def test_gpu_stack_serial_defaults_live_in_dsk_defaults():
    cluster = yaml.safe_load((ROLES / "dsk_defaults" / "defaults" / "main.yml").read_text())
    assert cluster["nvidia_driver_allow_reboot"] is False
    assert cluster["dsk_gpu_stack_serial"] == "100%"
    own = yaml.safe_load((ROLES / "nvidia_driver" / "defaults" / "main.yml").read_text())
    assert "nvidia_driver_allow_reboot" not in own  # one home
