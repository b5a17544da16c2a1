"""Editing the hosts file: comments and layout kept, refused edits change no byte."""

from __future__ import annotations

import os
import stat

import pytest

from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory
from dsk_provision.inventory_edit import NewNode, add_nodes, remove_node, set_cordon

HOSTS = """\
---
# Our cluster: rack 4.
all:
  vars:
    dsk_gpus_per_node: 8   # every node
  children:
    nodes:
      hosts:
        gpu01: {ansible_host: 10.0.0.1}   # first: rendezvous
        # the second one had a new board in March
        gpu02: {ansible_host: 10.0.0.2, ansible_port: 2222}
"""

BLOCK_HOSTS = """\
all:
  vars:
    dsk_gpus_per_node: 8
  children:
    nodes:
      hosts:
        gpu01:
          ansible_host: 10.0.0.1
"""


@pytest.fixture
def inv_dir(tmp_path):
    (tmp_path / "hosts.yml").write_text(HOSTS)
    os.chmod(tmp_path / "hosts.yml", 0o640)
    return tmp_path


def _bytes(path):
    return (path / "hosts.yml").read_bytes()


def test_add_keeps_comments_order_and_style(inv_dir):
    result = add_nodes(load_inventory(inv_dir), [NewNode("gpu03", "10.0.0.3", port=22, gpus=4)])
    text = (inv_dir / "hosts.yml").read_text()
    assert text == HOSTS + (
        "        gpu03: {ansible_host: 10.0.0.3, ansible_port: 22, dsk_gpus: 4}\n")
    assert [n.name for n in result.nodes] == ["gpu01", "gpu02", "gpu03"]
    assert result.node("gpu03").gpus == 4
    assert stat.S_IMODE((inv_dir / "hosts.yml").stat().st_mode) == 0o640
    assert [n.name for n in load_inventory(inv_dir).nodes] == ["gpu01", "gpu02", "gpu03"]


def test_add_in_block_style(tmp_path):
    (tmp_path / "hosts.yml").write_text(BLOCK_HOSTS)
    add_nodes(load_inventory(tmp_path), [NewNode("gpu02", "10.0.0.2")])
    assert (tmp_path / "hosts.yml").read_text() == BLOCK_HOSTS + (
        "        gpu02:\n          ansible_host: 10.0.0.2\n")


@pytest.mark.parametrize("node, words", [
    (NewNode("gpu02", "10.0.0.9"), "already in the inventory"),
    (NewNode("gpu09", "10.0.0.2", port=2222), "also the address of node 'gpu02'"),
    (NewNode("gpu09", "10.0.0.1"), "also the address of node 'gpu01'"),
    (NewNode("gpu09", "not an address!"), "ansible_host"),
    (NewNode("gpu/9", "10.0.0.9"), "not usable"),
    (NewNode("gpu09", "10.0.0.9", port=70000), "ansible_port"),
    (NewNode("gpu09", "10.0.0.9", gpus=99), "dsk_gpus"),
])
def test_bad_additions_change_no_byte(inv_dir, node, words):
    before = _bytes(inv_dir)
    with pytest.raises(InputError) as err:
        add_nodes(load_inventory(inv_dir), [node])
    assert words in str(err.value)
    assert str(inv_dir / "hosts.yml") in str(err.value)
    assert _bytes(inv_dir) == before
    assert sorted(p.name for p in inv_dir.iterdir()) == ["hosts.yml"]  # no temp file left


def test_two_new_nodes_with_one_name(inv_dir):
    before = _bytes(inv_dir)
    with pytest.raises(InputError, match="already in the inventory"):
        add_nodes(load_inventory(inv_dir), [NewNode("gpu03", "10.0.0.3"),
                                            NewNode("gpu03", "10.0.0.4")])
    assert _bytes(inv_dir) == before


def test_a_file_changed_meanwhile_is_not_overwritten(inv_dir, monkeypatch):
    inv = load_inventory(inv_dir)
    from dsk_provision import inventory_edit

    real = inventory_edit.load_inventory

    def edit_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        (inv_dir / "hosts.yml").write_text(HOSTS + "# edited by hand\n")
        return result
    monkeypatch.setattr(inventory_edit, "load_inventory", edit_meanwhile)
    with pytest.raises(InputError, match="changed by something else"):
        add_nodes(inv, [NewNode("gpu03", "10.0.0.3")])
    assert (inv_dir / "hosts.yml").read_text() == HOSTS + "# edited by hand\n"


def test_remove_keeps_the_rest_and_moves_host_vars(inv_dir):
    add_nodes(load_inventory(inv_dir), [NewNode("gpu03", "10.0.0.3")])
    (inv_dir / "host_vars").mkdir()
    (inv_dir / "host_vars" / "gpu02.yml").write_text("dsk_gpus: 4\n")
    result = remove_node(load_inventory(inv_dir), "gpu02")
    assert [n.name for n in result.nodes] == ["gpu01", "gpu03"]
    text = (inv_dir / "hosts.yml").read_text()
    assert "gpu02" not in text and "# Our cluster: rack 4." in text
    assert "# every node" in text and "# first: rendezvous" in text
    assert not (inv_dir / "host_vars" / "gpu02.yml").exists()
    assert (inv_dir / "host_vars" / ".removed" / "gpu02.yml").read_text() == "dsk_gpus: 4\n"
    assert [n.name for n in load_inventory(inv_dir).nodes] == ["gpu01", "gpu03"]


def test_remove_unknown_and_last_node(inv_dir):
    before = _bytes(inv_dir)
    with pytest.raises(InputError, match="no node named 'gpu07'"):
        remove_node(load_inventory(inv_dir), "gpu07")
    remove_node(load_inventory(inv_dir), "gpu02")
    with pytest.raises(InputError, match="only node"):
        remove_node(load_inventory(inv_dir), "gpu01")
    assert _bytes(inv_dir) != before and "gpu01" in (inv_dir / "hosts.yml").read_text()


def test_remove_from_a_child_group(tmp_path):
    (tmp_path / "hosts.yml").write_text("""\
all:
  vars: {dsk_gpus_per_node: 8}
  children:
    nodes:
      children:
        rack1:
          hosts:
            a1: {ansible_host: 10.0.1.1}
            a2: {ansible_host: 10.0.1.2}
""")
    result = remove_node(load_inventory(tmp_path), "a1")
    assert [n.name for n in result.nodes] == ["a2"]


def test_cordon_and_uncordon(inv_dir):
    inv = set_cordon(load_inventory(inv_dir), "gpu02", "GPU 3 Xid 79")
    assert inv.node("gpu02").cordoned == "GPU 3 Xid 79"
    assert [n.name for n in inv.active_nodes] == ["gpu01"]
    assert "gpu02: {ansible_host: 10.0.0.2, ansible_port: 2222, dsk_cordoned: GPU 3 Xid 79}" \
        in (inv_dir / "hosts.yml").read_text()
    inv = set_cordon(load_inventory(inv_dir), "gpu02", None)
    assert inv.node("gpu02").cordoned is None
    assert (inv_dir / "hosts.yml").read_text() == HOSTS


def test_cordon_overridden_by_host_vars_is_refused(inv_dir):
    (inv_dir / "host_vars").mkdir()
    (inv_dir / "host_vars" / "gpu01.yml").write_text("dsk_cordoned: false\n")
    before = _bytes(inv_dir)
    with pytest.raises(InputError, match="overrides the hosts file"):
        set_cordon(load_inventory(inv_dir), "gpu01", "fan")
    assert _bytes(inv_dir) == before


def test_cordon_needs_a_reason(inv_dir):
    with pytest.raises(InputError, match="needs a reason"):
        set_cordon(load_inventory(inv_dir), "gpu01", "  ")


def test_cordon_value_in_the_inventory_is_checked(inv_dir):
    (inv_dir / "hosts.yml").write_text(HOSTS.replace("{ansible_host: 10.0.0.1}",
                                                     "{ansible_host: 10.0.0.1, dsk_cordoned: 3}"))
    with pytest.raises(InputError, match="dsk_cordoned"):
        load_inventory(inv_dir)
    (inv_dir / "hosts.yml").write_text(HOSTS.replace(
        "{ansible_host: 10.0.0.1}", "{ansible_host: 10.0.0.1, dsk_cordoned: true}"))
    assert load_inventory(inv_dir).node("gpu01").cordoned == "cordoned"
