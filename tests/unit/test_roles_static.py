"""Static checks of playbooks/ and roles/, plus argument_specs enforcement at run time.

Lint runs the project's own configuration (.yamllint, .ansible-lint). The argument_specs
tests run a role against localhost (local connection, check mode) with a wrongly typed
variable and expect the run to stop at the role's argument validation, before any task.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, ROLES, node_module, run_role, tool

ALL_ROLES = sorted(p.name for p in ROLES.iterdir() if (p / "tasks").is_dir())
ENTRY_PLAYBOOKS = ["site.yml", "validate.yml"]
COMPONENT_PLAYBOOKS = ["preflight.yml", "common.yml", "gpu_stack.yml", "ssh_trust.yml",
                       "trainer_env.yml", "slurm.yml"]


def _load(path: Path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_yamllint_clean():
    proc = subprocess.run([tool("yamllint"), "-s", "playbooks", "roles"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_ansible_lint_production_clean():
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), NO_COLOR="1")
    proc = subprocess.run([tool("ansible-lint"), "--profile", "production", "--nocolor",
                           "playbooks", "roles"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def _imports(path: Path) -> list[str]:
    """The playbooks ``path`` imports, recursively, in order."""
    out = []
    for item in _load(path):
        name = item.get("ansible.builtin.import_playbook")
        if name:
            out.append(name)
            out += _imports(path.parent / name)
    return out


def test_bootstrap_playbooks_exist_and_site_imports_every_concern():
    site = _load(REPO / "playbooks" / "site.yml")
    assert site[0]["ansible.builtin.import_playbook"] == "boilerplate.yml"
    assert "always" in _load(REPO / "playbooks" / "boilerplate.yml")[0]["tags"]
    imported = {item["ansible.builtin.import_playbook"]: item.get("tags", []) for item in site}
    for concern in ("preflight", "common", "gpu_stack", "ssh_trust", "trainer_env", "slurm"):
        assert imported[f"components/{concern}.yml"] == [concern]


@pytest.mark.parametrize("entry", ENTRY_PLAYBOOKS)
def test_entry_playbooks_run_the_inventory_check_once_and_first(entry):
    imports = _imports(REPO / "playbooks" / entry)
    assert imports[0] == "boilerplate.yml", imports
    assert imports.count("boilerplate.yml") == 1, imports


@pytest.mark.parametrize("component", COMPONENT_PLAYBOOKS)
def test_component_playbooks_do_not_repeat_the_check(component):
    path = REPO / "playbooks" / "components" / component
    assert path.is_file(), path
    assert "boilerplate.yml" not in _imports(path)
    assert all(item.get("name") != "Check the control node and the inventory"
               for item in _load(path))


@pytest.mark.parametrize("role", ALL_ROLES)
def test_role_has_defaults_and_argument_specs(role):
    defaults = _load(ROLES / role / "defaults" / "main.yml") or {}
    specs = _load(ROLES / role / "meta" / "argument_specs.yml")
    options = specs["argument_specs"]["main"].get("options") or {}
    unprefixed = [key for key in defaults if not key.startswith(f"{role}_")]
    assert not unprefixed, f"defaults of {role} not prefixed with '{role}_': {unprefixed}"
    untyped = [key for key in defaults if "type" not in (options.get(key) or {})]
    assert not untyped, f"defaults of {role} without a type in argument_specs: {untyped}"


@pytest.mark.parametrize("role", ALL_ROLES)
def test_every_default_is_commented(role):
    """Every knob sits in a paragraph (lines without a blank between) that has a comment."""
    lines = (ROLES / role / "defaults" / "main.yml").read_text(encoding="utf-8").splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        if not line or line[0].isspace() or line.startswith(("#", "---")) or ":" not in line:
            continue
        paragraph = []
        for previous in reversed(lines[:i]):
            if not previous.strip():
                break
            paragraph.append(previous)
        if not any(p.lstrip().startswith("#") for p in paragraph) and "#" not in line:
            uncommented.append(line.split(":")[0])
    assert not uncommented, f"{role} defaults without a comment: {uncommented}"


def test_no_strict_host_key_checking_off_anywhere():
    for path in list((REPO / "roles").rglob("*")) + list((REPO / "playbooks").rglob("*")):
        if path.is_file() and path.suffix in (".yml", ".j2", ".py", ".cfg"):
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "StrictHostKeyChecking=no" not in text, path
            assert "StrictHostKeyChecking no" not in text, path


# --- argument_specs at run time --------------------------------------------------------

def _run_role(tmp_path: Path, role: str, extra: dict,
              playbook: Path | None = None) -> subprocess.CompletedProcess:
    return run_role(tmp_path, role, extra, playbook, host_vars={"dsk_gpus_per_node": 0})


WRONG_TYPES = [
    ("preflight", {"preflight_check_gpus": "maybe"}, "preflight_check_gpus"),
    ("common", {"common_apt_cache_valid_time": "soon"}, "common_apt_cache_valid_time"),
    ("trainer_env", {"trainer_env_pip_packages": {"torch": "2.13.0"}}, "trainer_env_pip_packages"),
    ("health_check", {"dsk_run_dir": "/nonexistent", "health_check_ssh_timeout": "soon"},
     "health_check_ssh_timeout"),
    ("health_check", {}, "dsk_run_dir"),
    ("preflight", {"dsk_gpus": "eight"}, "dsk_gpus"),
]


@pytest.mark.parametrize(("role", "extra", "variable"), WRONG_TYPES,
                         ids=[f"{r}-{v}" for r, _, v in WRONG_TYPES])
def test_argument_specs_reject_bad_variables_before_any_task(tmp_path, role, extra, variable):
    proc = _run_role(tmp_path, role, extra)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Validation of arguments failed" in out, out[-3000:]
    assert variable in out, out[-3000:]
    tasks = [line for line in out.splitlines() if line.startswith("TASK [")]
    assert len(tasks) == 1 and "Validating arguments against arg spec" in tasks[0], tasks


@pytest.mark.parametrize("playbook", ENTRY_PLAYBOOKS)
def test_misspelled_role_variable_stops_the_run_before_any_role(tmp_path, playbook):
    proc = _run_role(tmp_path, "", {"common_pakages": ["jq"], "dsk_run_dir": str(tmp_path)},
                     playbook=REPO / "playbooks" / playbook)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Unknown variables common_pakages" in out, out[-3000:]
    assert not [line for line in out.splitlines() if line.startswith("TASK [") and " : " in line]


def test_preflight_passes_in_check_mode_with_good_variables(tmp_path):
    """The control case: the same run with a correctly typed value gets past validation."""
    if not Path("/sys/bus/pci/devices").is_dir():
        pytest.skip("no /sys/bus/pci/devices here")
    if any((Path("/sys/bus/pci/devices") / d / "vendor").read_text().strip() == "0x10de"
           for d in os.listdir("/sys/bus/pci/devices")):
        pytest.skip("this machine has NVIDIA devices; dsk_gpus_per_node 0 would not match")
    proc = _run_role(tmp_path, "preflight", {"preflight_check_gpus": True,
                                             "preflight_allow_unsupported_os": True})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Detect NVIDIA GPUs and NVSwitches on the PCI bus" in out


# --- the roles' own modules ------------------------------------------------------------

def _module(role: str, name: str):
    return node_module(ROLES / role / "library" / f"{name}.py")


def _fake_pci(root: Path, devices: dict[str, tuple[str, str, str]]) -> Path:
    for address, (vendor, pci_class, device) in devices.items():
        entry = root / address
        entry.mkdir(parents=True)
        (entry / "vendor").write_text(vendor + "\n")
        (entry / "class").write_text(pci_class + "\n")
        (entry / "device").write_text(device + "\n")
    return root


FAKE_HGX = {
    "0000:00:02.0": ("0x8086", "0x030000", "0x1234"),   # an Intel VGA: not counted
    "0000:18:00.0": ("0x10de", "0x030200", "0x2335"),   # H200 (3D controller)
    "0000:2a:00.0": ("0x10de", "0x030200", "0x2335"),
    "0000:3a:00.0": ("0x10de", "0x030000", "0x2335"),   # VGA class counts as a GPU too
    "0000:05:00.0": ("0x10de", "0x068000", "0x22a3"),   # NVSwitch (bridge)
    "0000:06:00.0": ("0x10de", "0x040300", "0x22ba"),   # NVIDIA HD audio: neither
    "0000:07:00.0": ("0x15b3", "0x020700", "0x1021"),   # Mellanox HCA: not NVIDIA
}


def _pci_facts(sysfs: Path, nvswitch_ids: list[str], tmp_path: Path) -> dict:
    module = node_module(REPO / "library" / "dsk_gpu_node_state.py")
    (tmp_path / "dev").mkdir(exist_ok=True)
    return module.pci_facts({"sysfs_pci": str(sysfs), "nvswitch_pci_ids": nvswitch_ids,
                             "dev_dir": str(tmp_path / "dev"),
                             "nvswitch_proc_dir": str(tmp_path / "no-nvswitch-driver")})


def test_pci_scan_counts_nvidia_gpus_and_nvswitches(tmp_path):
    facts = _pci_facts(_fake_pci(tmp_path / "pci", FAKE_HGX), ["0x22A3"], tmp_path)
    assert facts["dsk_gpu_count_detected"] == 3
    assert [g["address"] for g in facts["dsk_gpus_detected"]] == [
        "0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0"]
    assert facts["dsk_nvswitch_count"] == 1
    assert facts["dsk_has_nvswitch"] is True


def test_pci_scan_of_a_cpu_machine_finds_nothing(tmp_path):
    root = _fake_pci(tmp_path / "pci", {"0000:00:02.0": ("0x8086", "0x030000", "0x1234")})
    facts = _pci_facts(root, [], tmp_path)
    assert facts["dsk_gpu_count_detected"] == 0
    assert facts["dsk_nvswitch_count"] == 0
    assert facts["dsk_has_nvswitch"] is False


def test_node_facts_gpu_models_and_driver_version(tmp_path, monkeypatch):
    mod = _module("health_check", "dsk_node_facts")
    assert mod.pci_gpus(str(_fake_pci(tmp_path / "pci", FAKE_HGX))) == ["10de:2335"] * 3
    monkeypatch.setattr(mod.shutil, "which", lambda _name: None)
    skipped: dict = {}
    assert mod.gpu_models(["10de:2335"], skipped) == ["10de:2335"]
    assert "nvidia-smi" in skipped["gpu_models"]
    text = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build"
            "  (dvs-builder@U22-I3-AE18-23-3)  Thu Oct  9 2025\nGCC version:  gcc 13.3.0\n")
    driver_file = mod.DRIVER_VERSION_FILE
    monkeypatch.setattr(mod, "_read", lambda path: text if path == driver_file else None)
    assert mod.nvidia_driver() == "580.159.04"
    monkeypatch.setattr(mod, "_read", lambda path: None)
    assert mod.nvidia_driver() is None


def test_node_facts_reports_a_missing_interpreter_as_skipped(tmp_path):
    mod = _module("health_check", "dsk_node_facts")
    skipped: dict = {}
    facts = mod.python_facts(str(tmp_path / "no-python"), 10, skipped)
    assert facts == {"path": str(tmp_path / "no-python"), "version": None, "torch": None,
                     "cuda_available": None}
    assert "does not exist" in skipped["python"]
    facts = mod.python_facts(sys.executable, 60, {})
    assert facts["version"] == sys.version.split()[0]
