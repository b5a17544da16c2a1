"""The mirror carries what the roles install: every apt install task of every role reads
one of the package lists the mirror reads (`<role>_*apt_packages`), and the mirror's
lists equal those Ansible itself renders from the roles' files, per OS, with GPUs and
without."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tool

from dsk_provision import mirror

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
OSES = ["debian-12", "ubuntu-22.04", "ubuntu-24.04"]
# The pinned-package install the GPU roles share: its packages are its callers' cuda_pkgs,
# each checked where it is included.
PINNED_IMPLEMENTATION = "roles/cuda/tasks/pinned_install.yml"
_LIST_EXPR = re.compile(r"\{\{\s*([a-z0-9_]+(?:\s*\+\s*[a-z0-9_]+)*)\s*\}\}")


def _tasks(node):
    """Every task dict in a task file, blocks included."""
    for task in node or []:
        if not isinstance(task, dict):
            continue
        yield task
        for key in ("block", "rescue", "always"):
            yield from _tasks(task.get(key))


def install_tasks(roles: Path = ROLES) -> list[tuple[str, str, object]]:
    """(file, task name, the package argument) of every apt install of the roles: the apt
    module's name, or cuda_pkgs of the pinned-package install the GPU roles share."""
    found = []
    for path in sorted(roles.glob("*/tasks/*.yml")):
        for task in _tasks(yaml.safe_load(path.read_text())):
            where = str(path.relative_to(roles.parent))
            if where == PINNED_IMPLEMENTATION:
                continue
            for module in ("ansible.builtin.apt", "ansible.builtin.package", "apt", "package"):
                args = task.get(module)
                if isinstance(args, dict) and "deb" not in args and "name" in args:
                    found.append((where, task.get("name", "?"), args["name"]))
            include = (task.get("ansible.builtin.include_role")
                       or task.get("ansible.builtin.include_tasks")
                       or task.get("ansible.builtin.import_tasks"))
            target = include.get("tasks_from") if isinstance(include, dict) else include
            if target == "pinned_packages.yml" and "cuda_pkgs" in (task.get("vars") or {}):
                found.append((where, task.get("name", "?"), task["vars"]["cuda_pkgs"]))
    return found


def mirrored_lists() -> set[str]:
    return {var for target in OSES for _, var in
            mirror.package_lists(mirror.read_role_vars(ROLES, mirror.TARGETS[target]))}


def test_every_install_task_reads_a_list_the_mirror_reads():
    tasks = install_tasks()
    # apt in common, trainer_env, nccl_tests; pinned installs in the GPU roles, rdma, containers.
    assert len(tasks) >= 10, tasks
    lists = mirrored_lists()
    wrong = []
    for where, name, value in tasks:
        m = _LIST_EXPR.fullmatch(value.strip()) if isinstance(value, str) else None
        names = [n.strip() for n in m.group(1).split("+")] if m else []
        if not names or not set(names) <= lists:
            wrong.append(f"{where}: {name}: {value!r}")
    assert not wrong, ("install tasks whose packages the mirror does not read (use the role's "
                       "<role>_apt_packages):\n" + "\n".join(wrong))


def test_the_scan_sees_packages_named_in_a_task_and_in_a_pinned_install(tmp_path):
    tasks = tmp_path / "roles/extra/tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text(yaml.safe_dump([
        {"name": "Install a tool", "block": [
            {"name": "Tool", "ansible.builtin.apt": {"name": ["htop"]}}]},
        {"name": "Pinned", "ansible.builtin.include_role": {
            "name": "cuda", "tasks_from": "pinned_packages.yml"},
         "vars": {"cuda_pkgs": [{"name": "tree"}]}},
        {"name": "From a file", "ansible.builtin.apt": {"deb": "/tmp/x.deb"}}]))
    found = install_tasks(tmp_path / "roles")
    assert [(name, value) for _, name, value in found] == [
        ("Tool", ["htop"]), ("Pinned", [{"name": "tree"}])]
    lists = mirrored_lists()
    assert not any(isinstance(v, str) and _LIST_EXPR.fullmatch(v) for _, _, v in found)
    assert "common_apt_packages" in lists and "common_packages" not in lists


def _ansible_lists(target: str, gpus: int, names: list[str], tmp_path: Path) -> dict:
    """The lists as ansible-playbook renders them: every role's defaults, then its vars
    (main and the OS's), loaded as Ansible loads variable files, for a host with the
    facts the mirror assumes."""
    os_vars = mirror.TARGETS[target].role_vars
    files = [str(p) for p in sorted(ROLES.glob("*/defaults/main.yml"))]
    files += [str(p) for p in sorted(ROLES.glob("*/vars/main.yml"))]
    files += [str(p) for p in sorted(ROLES.glob(f"*/vars/{os_vars}.yml"))]
    facts = {k: v for k, v in mirror.mirror_facts(mirror.TARGETS[target], gpus).items()
             if k != "ansible_facts"}
    inventory = tmp_path / f"hosts-{target}-{gpus}.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"node": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        **facts}}}}))
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False, "vars_files": files,
        "vars": {"render_names": names},
        "tasks": [{"name": "Render", "ansible.builtin.copy": {
            "dest": str(tmp_path / "rendered.json"), "mode": "0644",
            "content": "{{ dict(render_names"
                       " | zip(query('ansible.builtin.vars', *render_names))) | to_json }}"}}],
    }]))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    proc = subprocess.run([tool("ansible-playbook"), "-i", str(inventory), str(playbook)],
                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((tmp_path / "rendered.json").read_text())


@pytest.mark.parametrize("target", OSES)
@pytest.mark.parametrize("gpus", [8, 0])
def test_mirror_lists_equal_what_ansible_renders(target, gpus, tmp_path):
    from types import SimpleNamespace

    from dsk_provision.inventory import Node

    inventory = SimpleNamespace(path=Path("hosts.yml"), vars={}, nodes=[
        Node("node", "10.0.0.1", 22, "root", gpus, {})])
    plan = mirror.plan_mirror(inventory, [target])
    # Lists that need a fact the mirror cannot know before the nodes are reached (the
    # running kernel's headers) are left out with a note; every other list is rendered.
    noted = {var for var in mirrored_lists() if any(f"({var})" in n for n in plan.notes)}
    assert noted == ({"nvidia_driver_headers_apt_packages"} if gpus else set()), plan.notes
    names = sorted(mirrored_lists() - noted)
    rendered = _ansible_lists(target, gpus, names, tmp_path)
    want = {spec for var in names for spec in mirror.package_specs(rendered[var], var)}
    assert {r.spec for r in plan.apt[target]} == want
    assert {"jq", "python3-venv", "rdma-core", "docker.io"} <= want
    gpu_stack = {"cuda-toolkit-13-0", "nvidia-open-580", "nvidia-fabricmanager-580"}
    assert (gpu_stack <= {s.split("=")[0] for s in want}) == (gpus > 0)
