"""Names, addresses and paths of a sandbox: pure functions, no side effects.

The conventions are fixed in docs/architecture.md ("Sandbox conventions").
"""

from __future__ import annotations

import ipaddress
import os
import re
import zlib
from pathlib import Path

from dsk_provision.errors import InputError

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
NAME_RULE = "1-8 characters, a lowercase letter first, then lowercase letters or digits"
MAX_NODES = 64  # node i sits at .10+i; veth names must stay within 15 characters
FIRST_NODE_HOST = 10
MIRROR_PORT = 8080
DEFAULT_STATE_ROOT = "/var/lib/dsk-provision/sandbox"
DEFAULT_IMAGE_CACHE = "/var/cache/dsk-provision/images"
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)")
_RATE_BITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9,
              "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InputError(f"invalid sandbox name {name!r}: use {NAME_RULE}", field="name")
    return name


def validate_node_count(nodes: int, spare: int = 0) -> int:
    """``nodes`` in the inventory (1 or more) and ``spare`` beside them: at most
    MAX_NODES together."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise InputError(f"invalid node count {nodes!r}: must be 1 to {MAX_NODES}",
                         field="nodes")
    if nodes + spare > MAX_NODES:
        raise InputError(f"{nodes} nodes and {spare} spare make {nodes + spare}: a sandbox "
                         f"holds at most {MAX_NODES}", field="spare")
    return nodes


def derive_subnet(name: str) -> ipaddress.IPv4Network:
    """10.213.<k>.0/24 with k in 1..254, stable for a name."""
    k = zlib.crc32(name.encode()) % 254 + 1
    return ipaddress.IPv4Network(f"10.213.{k}.0/24")


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise InputError(f"invalid subnet {text!r}: {exc}", field="subnet",
                         hint="give a private IPv4 /24 network, e.g. 10.213.7.0/24") from None
    if net.version != 4 or net.prefixlen != 24 or not net.is_private:
        raise InputError(f"invalid subnet {text!r}: must be a private IPv4 /24 network",
                         field="subnet", hint="e.g. 10.213.7.0/24")
    return net


def bridge_ip(net: ipaddress.IPv4Network) -> str:
    return str(net.network_address + 1)


def node_name(i: int) -> str:
    return f"node{i}"


def node_ip(net: ipaddress.IPv4Network, i: int) -> str:
    return str(net.network_address + FIRST_NODE_HOST + i)


def bridge_name(name: str) -> str:
    return f"dskbr-{name}"


def netns_name(name: str, node: str) -> str:
    return f"dsk-{name}-{node}"


def machine_name(name: str, node: str) -> str:
    """systemd-nspawn machine name; unique across sandboxes (node names are not)."""
    return f"dsk-{name}-{node}"


def veth_name(name: str, i: int) -> str:
    return f"dsk{name}h{i}"


# The last-but-one byte of a sandbox MAC address: which interface it names.
_MAC_ROLE = {"node": 0x00, "host": 0x01, "bridge": 0x02}


def mac_address(name: str, role: str, i: int = 0) -> str:
    """A stable, locally administered unicast MAC for one of a sandbox's interfaces:
    ``role`` "node" (node i's eth0), "host" (node i's host-side veth) or "bridge".

    Stable so that a node restarted or reimaged at the same address keeps its MAC: with a
    new random one, the other nodes' neighbour caches would send to the old MAC until the
    entries expire (15-45 s of connection timeouts), and the bridge, which takes the
    lowest MAC of its ports unless given one, would change its own."""
    digest = zlib.crc32(name.encode()).to_bytes(4, "big")[:3]
    return ":".join(f"{b:02x}" for b in (0x02, *digest, _MAC_ROLE[role], i))


def veth_re(name: str) -> re.Pattern[str]:
    """Matches this sandbox's host-side veths and no other sandbox's."""
    return re.compile(rf"dsk{re.escape(name)}h(\d+)")


def netns_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"dsk-{re.escape(name)}-node(\d+)")


def mirror_url(net: ipaddress.IPv4Network) -> str:
    return f"http://{bridge_ip(net)}:{MIRROR_PORT}/"


def state_root() -> Path:
    return Path(os.environ.get("DSK_SANDBOX_ROOT") or DEFAULT_STATE_ROOT)


def state_dir(name: str) -> Path:
    return state_root() / name


def image_cache() -> Path:
    return Path(os.environ.get("DSK_IMAGE_CACHE") or DEFAULT_IMAGE_CACHE)


def parse_rate(rate: str) -> int:
    """A tc rate ("10mbit", "1gbit", "500kbps") -> bits per second."""
    m = _RATE_RE.fullmatch(rate.strip().lower()) if isinstance(rate, str) else None
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"invalid link rate {rate!r}: use a number and a unit such as "
                         "10mbit, 1gbit or 500kbps", field="rate")
    return int(float(m.group(1)) * _RATE_BITS[m.group(2)])
