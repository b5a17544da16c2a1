"""One home for every pin and default on the Ansible side.

A pin (a version, a branch, a path or port the nodes share) is written in exactly one
roles/*/defaults/main.yml; roles, playbooks, modules, inventories and the trainer read it
from there, so that a version bump is a one-line change. Argument specs type the knobs
and describe them; they carry no second copy of a default.

The control node's Python (dsk_provision/) is not scanned here: it reads the same files
through dsk_provision.defaults.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO, ROLES

from dsk_provision import defaults

# Where a copy of a pin would be a second home.
SCANNED = ("roles", "playbooks", "library", "module_utils", "inventory", "trainer")
SUFFIXES = {".yml", ".yaml", ".j2", ".py", ".cfg", ".sh", ".toml", ".json", ".conf"}
# The settings that are pins: versions, branches and the shared places and ports.
PIN_NAME = re.compile(r"_(version|branch|root|port|dir|home)$")
# Prose that names a pin is not a copy of it: comments, task names, descriptions.
PROSE = re.compile(r"^\s*(#|-?\s*(name|description|short_description):)")
ROLE_DIRS = sorted(p for p in ROLES.iterdir() if (p / "defaults" / "main.yml").is_file())
TASK_ROLES = sorted(p.name for p in ROLES.iterdir() if (p / "tasks").is_dir())


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def pins() -> dict[str, tuple[str, Path]]:
    """Every pin's value (resolved) -> (its name, its one home)."""
    found: dict[str, tuple[str, Path]] = {}
    for role_dir in ROLE_DIRS:
        home = role_dir / "defaults" / "main.yml"
        for name, raw in _yaml(home).items():
            if (not PIN_NAME.search(name) or isinstance(raw, (bool, list, dict))
                    or raw in ("", None)):
                continue
            try:
                value = str(defaults.resolve(name, role=role_dir.name))
            except (KeyError, ValueError):  # a Jinja expression or a run-time variable
                continue
            # Distinctive enough to grep for: a number, or a path below the top level.
            if not (re.search(r"\d", value) or value.count("/") >= 2):
                continue
            # A default that refers to another ({{ cuda_version }}) is not a home of its value.
            if "{{" in str(raw) and value in found:
                continue
            found.setdefault(value, (name, home))
    return found


def copies(value: str, home: Path, base: Path = REPO) -> list[str]:
    """Lines of the scanned folders under ``base``, outside ``home`` and outside prose,
    where ``value`` is written."""
    pattern = re.compile(r"(?<![\w.+-])" + re.escape(value) + r"(?![\w.+-])")
    out = []
    for top in SCANNED:
        for path in sorted((base / top).rglob("*")):
            if path == home or not path.is_file() or path.suffix not in SUFFIXES:
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line) and not PROSE.match(line):
                    out.append(f"{path.relative_to(base)}:{number}: {line.strip()}")
    return out


def test_the_pins_are_found():
    """The scan covers the pins a version bump touches (a test that finds none proves nothing)."""
    names = {name for name, _home in pins().values()}
    assert {"nvidia_driver_branch", "cuda_version", "nccl_version", "nccl_tests_version",
            "containers_toolkit_version", "dsk_root", "dsk_rdzv_port", "cuda_home"} <= names


@pytest.mark.parametrize("value", sorted(pins()))
def test_each_pin_is_written_once(value):
    name, home = pins()[value]
    found = copies(value, home)
    assert not found, (f"{name}={value!r} has its home in {home.relative_to(REPO)} but is "
                       f"written again (refer to {name} instead):\n" + "\n".join(found))


def test_a_copy_of_a_pin_is_found(tmp_path):
    """The scan sees a copy (a task that restates the driver branch as a fallback), and
    not the same value in prose, in a longer version, or in its home."""
    value = str(defaults.resolve("nvidia_driver_branch"))
    tasks = tmp_path / "roles" / "fabric_manager" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text(
        "---\n"
        f"# the branch, e.g. {value}\n"
        f"- name: Install branch {value}\n"
        "  ansible.builtin.debug:\n"
        f'    msg: "{{{{ x | default(\'{value}\') }}}} {value}.159.04 cuda{value}"\n')
    found = copies(value, tmp_path / "home.yml", base=tmp_path)
    assert len(found) == 1 and "default(" in found[0], found
    assert copies(value, tasks / "main.yml", base=tmp_path) == []


def _options_with_defaults(options: dict, where: str) -> list[str]:
    out = []
    for name, spec in (options or {}).items():
        if "default" in (spec or {}):
            out.append(f"{where}{name}")
        out += _options_with_defaults((spec or {}).get("options"), f"{where}{name}.")
    return out


@pytest.mark.parametrize("role", TASK_ROLES)
def test_argument_specs_carry_no_defaults(role):
    """Argument specs type and describe the knobs; their defaults live in defaults/main.yml
    (a second copy here would be documentation that can drift from the real value)."""
    specs = _yaml(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    found = []
    for entry, spec in specs.items():
        found += _options_with_defaults(spec.get("options"), f"{entry}: ")
    assert not found, f"roles/{role}/meta/argument_specs.yml has defaults: {found}"


def test_argument_specs_check_finds_a_default():
    assert _options_with_defaults({"a": {"type": "str", "options": {"b": {"default": 1}}}},
                                  "") == ["a.b"]


@pytest.mark.parametrize("role", TASK_ROLES)
def test_every_role_sees_the_cluster_defaults(role):
    deps = _yaml(ROLES / role / "meta" / "main.yml").get("dependencies") or []
    assert {"role": "dsk_defaults"} in deps or "dsk_defaults" in deps, role


def test_shared_role_knobs_are_typed_by_their_role():
    """A role's knob whose home is dsk_defaults is still in that role's argument specs, so
    the role validates it and the inventory check knows the name."""
    known = {role: set() for role in TASK_ROLES}
    for role in TASK_ROLES:
        for spec in _yaml(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"].values():
            known[role] |= set(spec.get("options") or {})
    for name in defaults.cluster_defaults():
        owner = max((r for r in TASK_ROLES if name.startswith(f"{r}_")), key=len, default=None)
        if owner:
            assert name in known[owner], f"{name}: not in roles/{owner}/meta/argument_specs.yml"


def test_no_default_filter_restates_a_shared_default():
    """Roles and playbooks read dsk_defaults' names directly: no `name | default(...)`."""
    names = "|".join(map(re.escape, defaults.cluster_defaults()))
    pattern = re.compile(r"\b(" + names + r")\s*\|\s*default\(")
    found = []
    for top in ("roles", "playbooks"):
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES:
                for number, line in enumerate(path.read_text().splitlines(), 1):
                    if pattern.search(line):
                        found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
