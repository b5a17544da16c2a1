"""Sandbox network: one bridge on the host, one network namespace and veth pair per node."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from dsk_provision.errors import InputError

from . import naming
from .host import run

PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")


def links() -> list[dict]:
    return json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")


def link_exists(ifname: str) -> bool:
    return run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0


def netns_list() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [n["name"] for n in json.loads(out)] if out else []


def host_addresses() -> list[tuple[str, ipaddress.IPv4Interface]]:
    data = json.loads(run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]")
    found = []
    for link in data:
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                found.append((link["ifname"],
                              ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")))
    return found


def subnet_conflicts(net: ipaddress.IPv4Network,
                     addresses: list[tuple[str, ipaddress.IPv4Interface]],
                     own_bridge: str) -> list[str]:
    """Host interfaces (other than our own bridge) whose addresses overlap net."""
    return [f"{ifname} ({iface})" for ifname, iface in addresses
            if ifname != own_bridge and not iface.ip.is_loopback
            and (iface.ip in net or iface.network.overlaps(net))]


def check_subnet_free(name: str, net: ipaddress.IPv4Network) -> None:
    clash = subnet_conflicts(net, host_addresses(), naming.bridge_name(name))
    if clash:
        raise InputError(f"subnet {net} is already in use on this host: {', '.join(clash)}",
                         field="subnet", hint="choose another with --subnet, e.g. "
                         "10.213.200.0/24")


def ensure_bridge(name: str, net: ipaddress.IPv4Network) -> None:
    br = naming.bridge_name(name)
    if not link_exists(br):
        run(["ip", "link", "add", br, "type", "bridge"])
    addr = f"{naming.bridge_ip(net)}/{net.prefixlen}"
    have = run(["ip", "-4", "-o", "addr", "show", "dev", br]).stdout
    if f" {addr} " not in have:
        run(["ip", "addr", "flush", "dev", br])
        run(["ip", "addr", "add", addr, "dev", br])
    run(["ip", "link", "set", br, "address", naming.mac_address(name, "bridge"), "up"])


def create_node_net(name: str, i: int, net: ipaddress.IPv4Network) -> None:
    node = naming.node_name(i)
    ns, veth = naming.netns_name(name, node), naming.veth_name(name, i)
    remove_node_net(name, i)
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth, "address", naming.mac_address(name, "host", i),
         "type", "veth", "peer", "name", "eth0", "address", naming.mac_address(name, "node", i),
         "netns", ns])
    run(["ip", "link", "set", veth, "master", naming.bridge_name(name), "up"])
    run(["ip", "-n", ns, "addr", "add", f"{naming.node_ip(net, i)}/{net.prefixlen}",
         "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", naming.bridge_ip(net)])


def remove_node_net(name: str, i: int) -> None:
    veth = naming.veth_name(name, i)
    ns = naming.netns_name(name, naming.node_name(i))
    # Deleted explicitly: a namespace kept alive by a lingering socket keeps its veth too.
    if link_exists(veth):
        run(["ip", "link", "del", veth])
    if ns in netns_list():
        run(["ip", "netns", "del", ns])


def remove_all(name: str) -> None:
    """Every veth, netns and the bridge of this sandbox, recorded or not."""
    vre, nre = naming.veth_re(name), naming.netns_re(name)
    for link in links():
        if vre.fullmatch(link["ifname"]):
            run(["ip", "link", "del", link["ifname"]], check=False)
    for ns in netns_list():
        if nre.fullmatch(ns):
            run(["ip", "netns", "del", ns], check=False)
    br = naming.bridge_name(name)
    if link_exists(br):
        run(["ip", "link", "del", br])


def set_rate(name: str, i: int, bits_per_s: int | None) -> None:
    """Shape both directions of a node's link with tbf (netem is not available here)."""
    veth = naming.veth_name(name, i)
    ns = naming.netns_name(name, naming.node_name(i))
    for prefix, dev in ((["tc"], veth), (["ip", "netns", "exec", ns, "tc"], "eth0")):
        if bits_per_s is None:
            has = run([*prefix, "qdisc", "show", "dev", dev, "root"]).stdout
            if "tbf" in has:
                run([*prefix, "qdisc", "del", "dev", dev, "root"])
        else:
            burst = max(4096, bits_per_s // 8 // 100)  # 10 ms worth of bytes
            run([*prefix, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", f"{bits_per_s}bit", "burst", str(burst), "latency", "400ms"])
