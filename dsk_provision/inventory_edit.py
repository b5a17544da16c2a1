"""Edit an inventory's hosts file the way a person would: comments, order, quoting and
layout are kept (a round-trip YAML parser, never string edits).

Every edit is checked as the inventory it would make (``load_inventory`` with the edited
text in place of the file) before anything is written; a refused edit leaves the file
byte-for-byte as it was. The write itself is atomic (dsk_provision.files.write_file), with
the file's mode kept.

Nodes are the hosts of ``all.children.nodes`` (and of its child groups); new nodes are
appended to ``all.children.nodes.hosts``, in the style (flow ``{...}`` or block) of the
entries already there, so the node-rank order of the existing nodes does not change.
"""

from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from dsk_provision.errors import InputError
from dsk_provision.files import write_file
from dsk_provision.inventory import NODES_GROUP, Inventory, load_inventory

_EXPLICIT_START = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\n)*---(?:[ \t\n]|$)")

# A node's cordon: the host variable, false or the reason the node was taken out.
CORDON_VAR = "dsk_cordoned"


@dataclass(frozen=True)
class NewNode:
    """A node to write into the inventory: its name, address and optional overrides."""

    name: str
    host: str
    port: int | None = None
    gpus: int | None = None

    def hostvars(self) -> dict[str, Any]:
        values: dict[str, Any] = {"ansible_host": self.host}
        if self.port is not None:
            values["ansible_port"] = self.port
        if self.gpus is not None:
            values["dsk_gpus"] = self.gpus
        return values


def _yaml() -> YAML:
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a long line the person wrote on one
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt


class _Doc:
    """The hosts file, parsed for a round trip."""

    def __init__(self, inventory: Inventory):
        self.file = inventory.hosts_file
        self.inventory_path = inventory.path
        self.original = self.file.read_bytes()
        self.yaml = _yaml()
        try:
            text = self.original.decode("utf-8")
            self.yaml.explicit_start = bool(_EXPLICIT_START.match(text))
            self.data = self.yaml.load(text)
        except (YAMLError, UnicodeDecodeError) as exc:  # load_inventory read it already
            raise InputError(f"cannot be edited: {exc}", file=str(self.file)) from exc

    def nodes_group(self) -> CommentedMap:
        return self.data["all"]["children"][NODES_GROUP]

    def node_hosts(self) -> CommentedMap:
        """all.children.nodes.hosts, made when the nodes are all in child groups."""
        group = self.nodes_group()
        if group is None:
            group = self.data["all"]["children"][NODES_GROUP] = CommentedMap()
        if group.get("hosts") is None:
            group["hosts"] = CommentedMap()
        return group["hosts"]

    def find_host(self, name: str) -> tuple[CommentedMap, Any] | None:
        """The mapping that holds host ``name`` under `nodes` (any depth), and its value."""
        def walk(group: Any, depth: int = 0):
            if not isinstance(group, dict) or depth > 16:
                return None
            hosts = group.get("hosts")
            if isinstance(hosts, dict) and name in hosts:
                return hosts, hosts[name]
            for child in (group.get("children") or {}).values():
                found = walk(child, depth + 1)
                if found:
                    return found
            return None
        return walk(self.nodes_group())

    def text(self) -> str:
        out = io.StringIO()
        self.yaml.dump(self.data, out)
        return out.getvalue()

    def host_entry(self, name: str) -> tuple[CommentedMap, Any]:
        found = self.find_host(name)
        if found is None:
            raise InputError(f"node {name!r} is not listed under all.children.nodes in "
                             "this file", file=str(self.file), field="all.children.nodes")
        return found

    def check_and_write(self, verify=None) -> Inventory:
        """Validate the edited inventory (and ``verify(inventory)``), then replace the
        file; nothing is written on error."""
        text = self.text()
        inventory = load_inventory(self.inventory_path, hosts_text=text)
        if verify is not None:
            verify(inventory)
        if self.file.read_bytes() != self.original:
            raise InputError("changed by something else while it was being edited; "
                             "run the command again", file=str(self.file))
        mode = stat.S_IMODE(os.stat(self.file).st_mode)
        write_file(self.file, text, mode=mode)
        return inventory


def _flow_like(hosts: CommentedMap) -> bool:
    """Whether the existing host entries are written as flow mappings ({...})."""
    for value in hosts.values():
        if isinstance(value, CommentedMap):
            return value.fa.flow_style()
    return False


def add_nodes(inventory: Inventory, nodes: list[NewNode], verify=None) -> Inventory:
    """Append ``nodes`` to all.children.nodes.hosts; return the inventory it makes.

    A name or an address that is already the inventory's, or a value the schema refuses,
    is an InputError naming the field, and the file is left unchanged; so is any error
    ``verify(inventory it would make)`` raises before the file is written."""
    if not nodes:
        raise InputError("no node to add", field="NAME")
    existing = {n.name: n for n in inventory.nodes}
    seen: set[str] = set()
    for node in nodes:
        if node.name in existing or node.name in seen:
            raise InputError(f"a node named {node.name!r} is already in the inventory",
                             file=str(inventory.hosts_file), field=f"all.children.nodes.hosts."
                             f"{node.name}", hint="choose another name, or use `nodes replace` "
                             "for new hardware under the same name")
        seen.add(node.name)
    doc = _Doc(inventory)
    hosts = doc.node_hosts()
    flow = _flow_like(hosts)
    for node in nodes:
        entry = CommentedMap(node.hostvars())
        if flow:
            entry.fa.set_flow_style()
        hosts[node.name] = entry
    return doc.check_and_write(verify)


def set_address(inventory: Inventory, name: str, host: str, port: int | None = None,
                verify=None) -> Inventory:
    """Give node ``name`` a new ``ansible_host`` (and ``ansible_port`` when given) in the
    hosts file; checked like add_nodes, ``verify`` included, before anything is written."""
    inventory.node(name)
    doc = _Doc(inventory)
    hosts, entry = doc.host_entry(name)
    if entry is None:
        entry = hosts[name] = CommentedMap()
        entry.fa.set_flow_style()
    entry["ansible_host"] = host
    if port is not None:
        entry["ansible_port"] = port

    def takes_effect(result: Inventory) -> None:
        node = result.node(name)
        if node.address != host or (port is not None and int(node.port) != port):
            raise InputError(f"the address of node {name!r} is also set in host_vars or a "
                             "group, which overrides the hosts file: change it there",
                             file=str(inventory.hosts_file), field=f"{name}.ansible_host")
        if verify is not None:
            verify(result)
    return doc.check_and_write(takes_effect)


def remove_node(inventory: Inventory, name: str) -> Inventory:
    """Take node ``name`` out of the hosts file (wherever under `nodes` it is listed).

    Its host_vars file or directory, if any, is moved to host_vars/.removed/ (Ansible and
    the loader skip hidden paths), so the inventory stays valid and nothing is lost; the
    move is undone when the edit is refused."""
    inventory.node(name)  # an InputError naming the nodes when there is none
    if len(inventory.nodes) == 1:
        raise InputError(f"{name!r} is the inventory's only node: a cluster needs one",
                         file=str(inventory.hosts_file),
                         field=f"all.children.nodes.hosts.{name}")
    doc = _Doc(inventory)
    hosts, _ = doc.host_entry(name)
    del hosts[name]
    moved: list[tuple[Path, Path]] = []
    try:
        for src in _host_vars_paths(inventory, name):
            dest = src.parent / ".removed" / src.name
            dest.parent.mkdir(mode=0o700, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{src.name}.{os.getpid()}")
            src.rename(dest)
            moved.append((src, dest))
        return doc.check_and_write()
    except BaseException:
        for src, dest in reversed(moved):
            dest.rename(src)
        raise


def _host_vars_paths(inventory: Inventory, name: str) -> list[Path]:
    base = inventory.hosts_file.parent / "host_vars"
    return [p for p in (base / name, base / f"{name}.yml", base / f"{name}.yaml",
                        base / f"{name}.json") if p.exists()]


def set_cordon(inventory: Inventory, name: str, reason: str | None) -> Inventory:
    """Cordon node ``name`` with ``reason`` (a non-empty string), or uncordon it (None).

    Written as the host's ``dsk_cordoned`` in the hosts file; uncordoning removes the key.
    Refused, unchanged, when a value elsewhere (host_vars, a group) would override it."""
    inventory.node(name)
    if reason is not None and not reason.strip():
        raise InputError("a cordon needs a reason, e.g. --reason 'GPU 3 Xid 79'",
                         field="--reason")
    doc = _Doc(inventory)
    hosts, entry = doc.host_entry(name)
    if reason is not None:
        if entry is None:
            entry = hosts[name] = CommentedMap()
            entry.fa.set_flow_style()
        entry[CORDON_VAR] = reason
    elif isinstance(entry, dict):
        entry.pop(CORDON_VAR, None)

    def takes_effect(result: Inventory) -> None:
        if result.node(name).cordoned != reason:
            raise InputError(f"{CORDON_VAR} of node {name!r} is also set in host_vars or a "
                             "group, which overrides the hosts file: remove it there first",
                             file=str(inventory.hosts_file), field=f"{name}.{CORDON_VAR}")
    return doc.check_and_write(takes_effect)
