"""Inventory validation: every bad inventory exits 2 naming file and field; good ones pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsk_provision.cli import app
from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory

HERE = Path(__file__).parent
BAD = HERE / "bad_inventories"
REPO = HERE.parent.parent
EXAMPLE = REPO / "inventory" / "example"

# fixture -> (field named in the message, words that say what to do)
BAD_CASES = {
    "yaml_syntax.yml": ("line 8, column 14", "YAML syntax error"),
    "empty.yml": ("all", "the file is empty"),
    "not_mapping.yml": ("(top level)", "must be a mapping starting with 'all:'"),
    "no_nodes_group.yml": ("all.children.nodes", "no group 'nodes'"),
    "empty_nodes.yml": ("all.children.nodes.hosts", "has no hosts"),
    "typo_ansible_host.yml": ("all.children.nodes.hosts.node2.ansible_hots",
                              "did you mean 'ansible_host'?"),
    "typo_gpus_per_node.yml": ("all.vars.dsk_gpu_per_node", "did you mean 'dsk_gpus_per_node'?"),
    "typo_children.yml": ("all.chidren", "did you mean 'children'?"),
    "bad_ipv4.yml": ("all.children.nodes.hosts.node1.ansible_host", "not a valid IPv4 address"),
    "bad_ipv6.yml": ("all.children.nodes.hosts.node1.ansible_host", "not a valid IPv6 address"),
    "bad_hostname.yml": ("all.children.nodes.hosts.node1.ansible_host", "not a valid host name"),
    "duplicate_address.yml": ("all.children.nodes.hosts.node2.ansible_host",
                              "also the address of node 'node1'"),
    "duplicate_host.yml": ("all.children.nodes.hosts.node1", "is written twice (lines 7 and 8)"),
    "duplicate_host_groups.yml": ("all.children.nodes.children.rack2.hosts.node1",
                                  "listed twice under 'nodes'"),
    "host_outside_nodes.yml": ("all.hosts.control", "not in group 'nodes'"),
    "gpus_out_of_range.yml": ("all.children.nodes.hosts.node1.dsk_gpus",
                              "use an integer from 0 to 16"),
    "gpus_not_integer.yml": ("all.vars.dsk_gpus_per_node", "must be an integer"),
    "gpus_unknown.yml": ("all.vars.dsk_gpus_per_node", "GPU count of node 'node2' is unknown"),
    "bad_cluster_name.yml": ("all.vars.dsk_cluster_name", "use lowercase letters"),
    "bad_ssh_port.yml": ("all.children.nodes.hosts.node1.ansible_port", "from 1 to 65535"),
    "bad_rdzv_port.yml": ("all.vars.dsk_rdzv_port", "from 1 to 65535"),
    "bad_profile.yml": ("all.vars.dsk_profile", "'H100 SXM'"),
    "insecure_ssh.yml": ("all.vars.ansible_ssh_common_args", "host keys must be pinned"),
}


def _check(path: Path):
    return CliRunner().invoke(app, ["check", "-i", str(path)])


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_inventory_exits_2_naming_file_and_field(name):
    field, advice = BAD_CASES[name]
    result = _check(BAD / name)
    output = result.output
    assert result.exit_code == 2, output
    assert output.startswith("error: ")
    assert f"{BAD / name}: {field}: " in output
    assert advice in output
    assert "Traceback" not in output


def test_group_vars_problem_names_the_group_vars_file():
    result = _check(BAD / "bad_group_vars")
    assert result.exit_code == 2
    gv = BAD / "bad_group_vars" / "group_vars" / "all.yml"
    assert f"{gv}: dsk_gpus_per_node: 99 is out of range" in result.output


def test_every_problem_is_reported_at_once():
    with pytest.raises(InputError) as info:
        load_inventory(BAD / "many_problems.yml")
    err = info.value
    assert err.exit_code == 2
    fields = {p.field for p in err.problems}
    assert fields == {
        "all.vars.dsk_cluster_name",
        "all.children.nodes.hosts.node1.dsk_gpus",
        "all.children.nodes.hosts.node2.ansible_hots",
        "all.children.nodes.hosts.node3.ansible_host",
    }
    assert str(err).startswith("4 problems in the inventory:")
    assert err.file == str(BAD / "many_problems.yml")


def test_missing_path_is_input_error():
    result = _check(BAD / "does-not-exist.yml")
    assert result.exit_code == 2
    assert "inventory not found" in result.output


def test_subprocess_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "dsk_provision", "check", "-i",
                           str(BAD / "typo_ansible_host.yml")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "did you mean 'ansible_host'?" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_example_inventory_passes_check():
    result = _check(EXAMPLE)
    assert result.exit_code == 0, result.output
    assert "inventory OK" in result.output
    inv = load_inventory(EXAMPLE)
    assert [n.name for n in inv.nodes] == ["gpu01", "gpu02", "gpu03", "gpu04"]
    assert all(n.gpus == 8 for n in inv.nodes) and inv.total_gpus == 32
    assert inv.first_node.address == "10.20.0.11"
    assert inv.vars["dsk_cluster_name"] == "example"
    assert inv.ansible_inventory_path == EXAMPLE / "hosts.yml"


def test_directory_form_merges_group_vars(tmp_path):
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "hosts.yml").write_text(
        "all:\n"
        "  vars: {dsk_rdzv_port: 29400}\n"
        "  children:\n"
        "    nodes:\n"
        "      vars: {ansible_user: ops}\n"
        "      hosts:\n"
        "        a: {ansible_host: 192.168.1.10}\n"
        "        b: {ansible_host: 'fd00::2', dsk_gpus: 4, ansible_port: 2222}\n"
        "        c.example.com:\n")
    (tmp_path / "group_vars" / "all.yml").write_text(
        "dsk_cluster_name: lab-1\ndsk_gpus_per_node: 8\n")
    (tmp_path / "group_vars" / "nodes.yml").write_text("dsk_socket_ifname: ib0\n")
    inv = load_inventory(tmp_path)
    a, b, c = inv.nodes
    assert (a.name, a.address, a.port, a.user, a.gpus) == ("a", "192.168.1.10", 22, "ops", 8)
    assert (b.address, b.port, b.gpus) == ("fd00::2", 2222, 4)
    assert c.address == "c.example.com"  # no ansible_host: the host name is the address
    assert a.vars["dsk_socket_ifname"] == "ib0" and a.vars["dsk_rdzv_port"] == 29400
    assert inv.vars == {"dsk_rdzv_port": 29400, "dsk_cluster_name": "lab-1",
                        "dsk_gpus_per_node": 8}
    assert inv.cluster_name == "lab-1"
    # a file inside the directory gives the same cluster (Ansible reads group_vars beside it)
    assert load_inventory(tmp_path / "hosts.yml").nodes == inv.nodes


def test_open_private_key_is_rejected(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key\n")
    os.chmod(key, 0o644)
    (tmp_path / "hosts.yml").write_text(
        "all:\n"
        f"  vars: {{dsk_gpus_per_node: 0, ansible_ssh_private_key_file: {key}}}\n"
        "  children: {nodes: {hosts: {n1: {ansible_host: 10.1.1.1}}}}\n")
    with pytest.raises(InputError) as info:
        load_inventory(tmp_path)
    assert info.value.field == "all.vars.ansible_ssh_private_key_file"
    assert "chmod 600" in str(info.value)
    os.chmod(key, 0o600)
    assert load_inventory(tmp_path).nodes[0].name == "n1"


def test_profile_must_name_a_known_profile(tmp_path, monkeypatch):
    import dsk_provision.inventory as inventory

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "h200-sxm-8.yml").write_text("gpus: 8\n")
    monkeypatch.setattr(inventory, "PROFILES_DIR", profiles)
    inventory.known_profiles.cache_clear()
    try:
        hosts = tmp_path / "hosts.yml"
        hosts.write_text("all:\n  vars: {dsk_gpus_per_node: 8, dsk_profile: h999}\n"
                         "  children: {nodes: {hosts: {n1: {ansible_host: 10.1.1.1}}}}\n")
        with pytest.raises(InputError) as info:
            load_inventory(hosts)
        assert info.value.field == "all.vars.dsk_profile"
        assert "unknown profile 'h999'" in str(info.value) and "h200-sxm-8" in str(info.value)
        hosts.write_text(hosts.read_text().replace("h999", "h200-sxm-8"))
        assert load_inventory(hosts).profile == "h200-sxm-8"
        # without a profiles directory any well-formed name is accepted
        monkeypatch.setattr(inventory, "PROFILES_DIR", tmp_path / "none")
        inventory.known_profiles.cache_clear()
        hosts.write_text(hosts.read_text().replace("h200-sxm-8", "h999"))
        assert load_inventory(hosts).profile == "h999"
    finally:
        inventory.known_profiles.cache_clear()
